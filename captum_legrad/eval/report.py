"""Writing evaluation results: the Markdown table, the CSV and the figures.

Figures are drawn by :mod:`captum_legrad.viz` (matplotlib without pyplot), so writing a
report changes no process-wide state.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .. import viz
from .files import atomic_path
from .harness import COLUMNS, METHODS, EvalOutcome
from .metrics import DEFAULT_FRACTIONS
from .models import LoadedModel

__all__ = ["markdown_table", "write_csv", "write_report", "save_examples", "save_curves"]

Results = Dict[str, Dict[str, float]]


def _display_name(key: str) -> str:
    return METHODS[key][0] if key in METHODS else key


def _format(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.1f}"


def markdown_table(results: Results) -> str:
    """A Markdown table of the measured columns, one row per method."""
    columns = [
        (key, header)
        for key, header in COLUMNS
        if any(not math.isnan(row.get(key, float("nan"))) for row in results.values())
    ]
    lines = [
        "| Method | " + " | ".join(header for _, header in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, row in results.items():
        cells = [_format(row.get(key, float("nan"))) for key, _ in columns]
        lines.append(f"| {_display_name(name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(path: Path, results: Results) -> None:
    """Every measured value, one row per method (written atomically).

    Columns that no method measured (NaN in every row, e.g. ``p_miou`` without point
    labels) are left out; a NaN in a kept column means that method was not measured there.
    """
    keys = sorted(
        key
        for key in {key for row in results.values() for key in row}
        if any(not math.isnan(row.get(key, float("nan"))) for row in results.values())
    )
    with (
        atomic_path(path) as temporary,
        open(temporary, "w", newline="", encoding="utf-8") as handle,
    ):
        writer = csv.writer(handle)
        writer.writerow(["method", *keys])
        for name, row in results.items():
            writer.writerow([name, *(f"{row.get(key, float('nan')):.6g}" for key in keys)])


def write_report(out: Path, title: str, description: List[str], results: Results) -> str:
    """``out/results.md`` (title, description, table) and ``out/results.csv``; returns the table."""
    table = markdown_table(results)
    text = "\n".join([f"# {title}", "", *description, "", table, ""])
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "results.md") as temporary:
        temporary.write_text(text, encoding="utf-8")
    write_csv(out / "results.csv", results)
    return table


def save_examples(
    path: Path,
    loaded: LoadedModel,
    outcome: EvalOutcome,
    methods: Optional[Sequence[str]] = None,
    classes: Optional[Sequence[str]] = None,
    title: Optional[str] = "Example explanations",
) -> bool:
    """The kept example pairs, the image and one overlay per method; False if none were kept.

    The title gets a second line that says what is drawn: the row label is the explained
    class, the explained object's outline (where the data have masks) is white on the image
    column, and each map is min-max scaled (the colour bar).
    """
    batch, maps = outcome.example_batch, outcome.example_maps
    if batch is None or not maps:
        return False
    shown: Mapping[str, Tensor] = {
        _display_name(k): v for k, v in maps.items() if methods is None or k in methods
    }
    n = next(iter(shown.values())).shape[0]
    labels = [
        str(classes[int(t)]) if classes is not None else str(int(t)) for t in batch.targets[:n]
    ]
    masks = batch.masks[:n].cpu() if batch.masks is not None else None
    legend = "row label: the explained class" + (
        "; white line on the image: that object's outline" if masks is not None else ""
    )
    title = f"{title}\n{legend}" if title else legend
    figure = viz.plot_methods(
        batch.images[:n].cpu(),
        shown,
        labels,
        masks=masks,
        mean=torch.tensor(loaded.mean),
        std=torch.tensor(loaded.std),
        title=title,
        colorbar=True,
    )
    _save(figure, path)
    return True


def _save(figure: Any, path: Path) -> None:
    with atomic_path(path) as temporary:
        figure.savefig(
            temporary, format=path.suffix.lstrip(".") or "png", dpi=100, bbox_inches="tight"
        )


def save_curves(path: Path, outcome: EvalOutcome, title: Optional[str] = None) -> bool:
    """The mean perturbation curves of every method; False if none were measured.

    Each curve is the model's accuracy on the explained class (the share of (image,
    target) pairs it still gets right) while patches are removed in the method's order.
    """
    curves = outcome.curves()
    if not curves:
        return False
    named = {_display_name(name): value for name, value in curves.items()}
    heading = "Model accuracy on the explained class as patches are removed" + (
        f" ({title})" if title else ""
    )
    figure = viz.plot_curves(
        DEFAULT_FRACTIONS,
        named,
        ylabel="accuracy on the explained class (share of pairs)",
        title=heading,
    )
    _save(figure, path)
    return True
