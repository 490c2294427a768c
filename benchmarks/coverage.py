"""Which models LeGrad explains: a sweep over timm's whole registry (one model per timm
module), plus the plug-in sweeps of other libraries, written as one Markdown table.

For every timm module (``timm.list_modules()``) one model is built with
``pretrained=False`` at a small size (shrunk depth/width where the constructor takes them;
a configuration whose plain forward fails counts as not built, and the next, less shrunk,
one is tried), then ``discover`` and one ``LeGrad.attribute`` call run. Each row is

* ``works``: a finite map (a warned all-zero map says so in the detail);
* ``refused``: ``UnsupportedModelError``, with its reason;
* ``error``: anything else (a defect);
* ``could not build``: no configuration could be built and run by timm itself.

Plug-ins: ``benchmarks/coverage_hf.py`` (``sweep_hf()``) and
``benchmarks/coverage_open_clip.py`` (``sweep_open_clip()``), if present, each return rows
``(family, name, status, detail)`` with status in ``{"works", "refused", "error"}``.

Usage::

    HF_HUB_OFFLINE=1 python benchmarks/coverage.py --out docs/coverage.md [--timeout 120]
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import signal
import sys
import time
import warnings
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _common import explainable  # noqa: E402  (the benchmarks folder is not a package)

from captum_legrad import LeGrad, UnsupportedModelError, discover  # noqa: E402

#: (library, family/module, model, status, detail)
Row = Tuple[str, str, str, str, str]

SMALL = dict(depth=3, embed_dim=32, num_heads=2)
#: Configurations larger than this (counted on the meta device first) are not built.
MAX_PARAMS = 150_000_000
#: Per-model additions to the shrunk configurations (those with ``depth=3``), by name
#: substring: what the small depth would otherwise break. SAM: its global-attention block
#: indices (5/7, 11/15, ... for large/huge) lie beyond depth 3, so one global block is put
#: at index 2 (where ``samvit_base`` has its first); Sapiens2: its per-block key/value head
#: counts have one entry per block of the full depth, so three are given (grouped-query
#: attention in the middle block, full attention around it, as Sapiens2 is built).
VARIANTS: Tuple[Tuple[str, Dict[str, Any]], ...] = (
    ("samvit_", dict(global_attn_indexes=(2,))),
    ("_sapiens2", dict(num_kv_heads=(2, 1, 2))),
)
#: Substrings of small model names, most preferred first.
PREFERRED = ("tiny", "nano", "pico", "femto", "atto", "xxs", "xs", "small", "_s", "base")


def pick_model(names: Sequence[str]) -> str:
    """The model of a module to sweep: a small-sounding one, not an encoder-only variant."""
    candidates = [n for n in names if not n.endswith("_enc")] or list(names)
    for word in PREFERRED:
        hits = sorted((n for n in candidates if word in n), key=lambda n: (len(n), n))
        if hits:
            return hits[0]
    return sorted(candidates, key=lambda n: (len(n), n))[0]


class Timeout(Exception):
    """The per-model time limit was reached."""


def _alarm(signum: int, frame: Optional[FrameType]) -> None:
    raise Timeout()


def _randomize(model: torch.nn.Module) -> None:
    """Random values for all-zero weight matrices (zero-initialised heads)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1 and not param.any():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)


def _input_size(model: torch.nn.Module, img_size: Optional[int]) -> Tuple[int, int]:
    if img_size is not None:
        return img_size, img_size
    cfg: Dict[str, Any] = dict(getattr(model, "pretrained_cfg", None) or {})
    size = cfg.get("input_size", (3, 224, 224))
    return int(size[-2]), int(size[-1])


def _parameters(name: str, kwargs: Dict[str, Any]) -> Optional[int]:
    """Parameter count of a configuration, built on the meta device (None if that fails)."""
    import timm

    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs)
    except Exception:
        return None
    return sum(p.numel() for p in model.parameters())


def _fit_to_patches(name: str, kwargs: Dict[str, Any], size: int) -> int:
    """``size`` rounded down to a multiple of the configuration's patch size (LeGrad takes
    inputs that are a multiple of it: 56 for 14-pixel patches); ``size`` where the patch
    size cannot be read."""
    import timm

    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs)
    except Exception:
        return size
    embed = getattr(model, "patch_embed", None)
    patch = getattr(embed, "patch_size", None) or getattr(model, "patch_size", None)
    if patch is None:
        return size
    p_h, p_w = (patch, patch) if isinstance(patch, int) else (int(patch[0]), int(patch[-1]))
    if p_h != p_w or p_h > size:
        return size
    return size // p_h * p_h


def build(name: str) -> Tuple[torch.nn.Module, torch.Tensor, str]:
    """The smallest configuration of ``name`` that timm builds and runs forward (none
    larger than :data:`MAX_PARAMS` parameters is built)."""
    import timm

    extra: Dict[str, Any] = {}
    for part, kwargs in VARIANTS:
        if part in name:
            extra.update(kwargs)
    attempts: List[Tuple[Dict[str, Any], Optional[int]]] = [
        ({**SMALL, **extra, "img_size": 64}, 64),
        ({**SMALL, **extra}, None),
        ({"depth": 3, **extra, "img_size": 64}, 64),
        ({"img_size": 64}, 64),
        ({}, None),
    ]
    failures = []
    for kwargs, img_size in attempts:
        if img_size is not None:
            img_size = _fit_to_patches(name, kwargs, img_size)
            kwargs = {**kwargs, "img_size": img_size}
        count = _parameters(name, kwargs)
        if count is not None and count > MAX_PARAMS:
            failures.append(f"{count / 1e6:.0f}M parameters with {kwargs or 'defaults'}: skipped")
            continue
        try:
            model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs).eval()
            h, w = _input_size(model, img_size)
            x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                model(x)
        except Timeout:
            raise
        except Exception as error:
            failures.append(f"{type(error).__name__}: {error}")
            continue
        _randomize(model)
        return model, x, ", ".join(f"{k}={v}" for k, v in kwargs.items()) or "defaults"
    raise RuntimeError(failures[-1] if failures else "no configuration")


def _short(text: str, limit: int = 160) -> str:
    text = re.sub(r"\s+", " ", str(text)).strip().replace("|", "/")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _reason(error: UnsupportedModelError) -> str:
    message = str(error)
    match = re.search(r"cannot be explained by LeGrad: (.*?)\. LeGrad needs", message)
    return match.group(1) if match else message.split(". ")[0]


def check(model: torch.nn.Module, x: torch.Tensor) -> Tuple[str, str]:
    """``(status, detail)`` of discover + one attribute call."""
    try:
        spec = discover(model)
    except UnsupportedModelError as error:
        return "refused", _reason(error)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            explained = explainable(model, x, spec)  # feature models: their dimensions
            legrad = LeGrad(explained, spec=spec if explained is model else None)
            grid = legrad.attribute(x, target=0, output="grid", normalize=False)
    except UnsupportedModelError as error:
        return "refused", _reason(error)
    except Timeout:
        raise
    except Exception as error:
        return "error", f"{type(error).__name__}: {error}"
    if not torch.isfinite(grid).all():
        return "error", "non-finite map"
    detail = (
        f"{type(model).__name__}: {spec.num_layers} layers, {spec.num_prefix_tokens} prefix, "
        f"grid {tuple(grid.shape[-2:])}"
    )
    if not grid.any():
        warned = [str(w.message) for w in caught if "all zeros" in str(w.message)]
        detail += "; all-zero map" + (" (warned)" if warned else " (NOT warned)")
        if not warned:
            return "error", detail
    return "works", detail


def sweep_timm(
    timeout: int,
    modules: Optional[Sequence[str]] = None,
    log: Callable[[str], None] = print,
    every: bool = False,
) -> Iterator[Row]:
    """One row per timm module (``every``: one row per model of those modules)."""
    import timm

    signal.signal(signal.SIGALRM, _alarm)
    jobs = []
    for module in modules or timm.list_modules():
        names = timm.list_models(module=module)
        if names:
            jobs += [(module, n) for n in names] if every else [(module, pick_model(names))]
    for module, name in jobs:
        start = time.time()
        phase = "could not build"  # a timeout while building is timm's, not LeGrad's
        signal.alarm(timeout)
        try:
            try:
                model, x, config = build(name)
            except Timeout:
                raise
            except Exception as error:
                row: Row = ("timm", module, name, "could not build", _short(str(error)))
            else:
                phase = "error"
                status, detail = check(model, x)
                row = ("timm", module, name, status, _short(f"{detail} [{config}]"))
        except Timeout:
            row = ("timm", module, name, phase, f"timed out after {timeout} s")
        finally:
            signal.alarm(0)
        log(f"{module:28s} {name:40s} {row[3]:16s} {time.time() - start:6.1f}s {row[4][:90]}")
        yield row


def plugin_rows(log: Callable[[str], None] = print) -> List[Row]:
    """Rows of ``benchmarks/coverage_hf.py`` / ``coverage_open_clip.py`` where present."""
    rows: List[Row] = []
    for module_name, function, library in (
        ("coverage_hf", "sweep_hf", "hf"),
        ("coverage_open_clip", "sweep_open_clip", "open_clip"),
    ):
        path = Path(__file__).resolve().parent / f"{module_name}.py"
        if not path.exists():
            continue
        spec = importlib.util.spec_from_file_location(module_name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for family, name, status, detail in getattr(module, function)():
            rows.append((library, family, name, status, _short(detail)))
            log(f"{library:10s} {family:20s} {name:40s} {status}")
    return rows


def summary(rows: Sequence[Row]) -> Dict[str, Dict[str, int]]:
    """Counts per library and status."""
    counts: Dict[str, Dict[str, int]] = {}
    for library, _, _, status, _ in rows:
        counts.setdefault(library, {}).setdefault(status, 0)
        counts[library][status] += 1
    return counts


def every_section(rows: Sequence[Row]) -> str:
    """Every model of some timm modules: counts per module and the rows that do not work."""
    per_module: Dict[str, Dict[str, int]] = {}
    for _, module, _, status, _ in rows:
        per_module.setdefault(module, {}).setdefault(status, 0)
        per_module[module][status] += 1
    statuses = ("works", "refused", "error", "could not build")
    lines = [
        "",
        "## Every model of the ViT modules",
        "",
        "The same check for every model of these timm modules (`--every`), at the same small "
        "sizes (a configuration over 150M parameters is not built).",
        "",
        "| module | works | refused | error | could not build |",
        "|---|---|---|---|---|",
    ]
    for module, counts in per_module.items():
        lines.append(f"| {module} | " + " | ".join(str(counts.get(s, 0)) for s in statuses) + " |")
    total = summary(rows).get("timm", {})
    lines.append("| **all** | " + " | ".join(f"**{total.get(s, 0)}**" for s in statuses) + " |")
    lines += ["", "Models that do not work:", "", "| module | model | status | detail |"]
    lines += ["|---|---|---|---|"]
    for _, module, name, status, detail in rows:
        if status != "works":
            lines.append(f"| {module} | `{name}` | {status} | {detail} |")
    return "\n".join(lines) + "\n"


def markdown(rows: Sequence[Row], versions: str) -> str:
    """The coverage page."""
    lines = [
        "# Model coverage",
        "",
        "Generated by `python benchmarks/coverage.py` (random init, small configurations, "
        f"one `discover` and one `attribute` call per model; {versions}). timm: one model per "
        "module of `timm.list_modules()`; `refused` is an `UnsupportedModelError` with the "
        "reason shown, `error` anything else, `could not build` a configuration timm itself "
        "could not build and run at the sizes tried.",
        "",
        "| library | works | refused | error | could not build | total |",
        "|---|---|---|---|---|---|",
    ]
    for library, counts in summary(rows).items():
        total = sum(counts.values())
        cells = [str(counts.get(s, 0)) for s in ("works", "refused", "error", "could not build")]
        lines.append(f"| {library} | {' | '.join(cells)} | {total} |")
    lines += ["", "| library | family / module | model | status | detail |"]
    lines += ["|---|---|---|---|---|"]
    for library, family, name, status, detail in rows:
        lines.append(f"| {library} | {family} | `{name}` | {status} | {detail} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "coverage.md")
    parser.add_argument("--timeout", type=int, default=120, help="seconds per model")
    parser.add_argument("--modules", nargs="*", help="timm modules to sweep (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--every", action="store_true", help="every model of the modules, not one per module"
    )
    parser.add_argument("--no-plugins", action="store_true", help="timm only")
    parser.add_argument(
        "--also-every",
        nargs="*",
        default=(),
        help="timm modules whose every model is checked too, in a section of its own",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning, module="timm")
    import timm

    rows = list(sweep_timm(args.timeout, args.modules, every=args.every))
    if not args.no_plugins:
        rows += plugin_rows()
    versions = f"timm {timm.__version__}, torch {torch.__version__.split('+')[0]}"
    text = markdown(rows, versions)
    if args.also_every:
        every = list(sweep_timm(args.timeout, args.also_every, every=True))
        text += every_section(every)
        print(summary(every))
    args.out.write_text(text)
    print(summary(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
