"""Coverage of OpenCLIP: every configuration of ``open_clip.list_models()`` through LeGrad.

Each configuration is built with random weights (``pretrained=None``, nothing is
downloaded), shrunk so that the sweep runs on a CPU: the image tower keeps its width,
patch size, image size, pooling and head but only ``LAYERS`` blocks (timm trunks are
created with ``depth=LAYERS`` where the architecture takes it), the text tower one layer
and a 1000-token vocabulary.
Configurations whose text tower is a Hugging Face model (``hf_model_name``: the XLM-R, mT5,
NLLB and RoBERTa pairs) would need the hub for the text configuration, so only their image
tower (``model.visual``, built by OpenCLIP's own ``_build_vision_tower``) is checked.

A row is ``works`` when ``LeGrad(model).attribute`` on one image at the configuration's
size gives a finite, non-constant map of the right shape and leaves every parameter and
buffer of the model unchanged; ``refused`` when LeGrad raises ``UnsupportedModelError``
(the message is the detail); ``error`` for anything else (a bug) or a configuration that
took longer than ``TIME_LIMIT_S`` seconds.

Run alone: ``python benchmarks/coverage_open_clip.py`` prints a Markdown table and the
fractions (``--only NAME ...`` for a few configurations). All 144 configurations of open_clip
3.3 take about 15 minutes on 2 idle CPU cores (the giant towers, even at 2 blocks, dominate)
and a few GB of memory.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from _common import explainable  # the benchmarks folder is not a package

#: Blocks kept in the image tower.
LAYERS = 2
#: Seconds one configuration may take (build and attribution).
TIME_LIMIT_S = 240

Row = Tuple[str, str, str, str]


class _TimeUp(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    """Raise ``_TimeUp`` after ``seconds`` (main thread, POSIX); a no-op elsewhere."""
    if not hasattr(signal, "SIGALRM") or seconds <= 0:
        yield
        return

    def alarm(signum: int, frame: Any) -> None:
        raise _TimeUp(f"took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def _shallow_timm() -> Iterator[None]:
    """``timm.create_model`` with ``depth=LAYERS`` (or one block per stage) while building.

    Only this sweep does this, to build the giant configurations on a CPU; the library
    never touches timm.
    """
    import open_clip.timm_model as timm_model

    timm = timm_model.timm
    original = timm.create_model

    def create_model(name: str, *args: Any, **kwargs: Any) -> Any:
        for extra in ({"depth": LAYERS}, {"depths": (1, 1, 1, 1)}, {"layers": (1, 1, 1, 1)}):
            try:
                return original(name, *args, **{**kwargs, **extra})
            except (TypeError, ValueError, AssertionError, IndexError, RuntimeError):
                continue
        return original(name, *args, **kwargs)

    timm.create_model = create_model
    try:
        yield
    finally:
        timm.create_model = original


def _shrunk_config(name: str) -> Dict[str, Any]:
    import open_clip

    config = copy.deepcopy(open_clip.get_model_config(name))
    vision = config.get("vision_cfg", {})
    if isinstance(vision.get("layers"), int):
        vision["layers"] = min(int(vision["layers"]), LAYERS)
    for tower in ("text_cfg", "multimodal_cfg"):
        text = config.get(tower)
        if isinstance(text, dict) and isinstance(text.get("layers"), int):
            text["layers"] = 1
        if isinstance(text, dict) and int(text.get("vocab_size", 0)) > 1000:
            text["vocab_size"] = 1000  # the 900k-token worldwide vocabularies alone are GBs
    return config


def _build(name: str) -> Tuple[torch.nn.Module, str]:
    """The shrunk model (or its image tower) and a note on what was built."""
    import open_clip
    from open_clip.model import _build_vision_tower

    config = _shrunk_config(name)
    vision = config["vision_cfg"]
    with _shallow_timm():
        if config.get("text_cfg", {}).get("hf_model_name"):
            visual = _build_vision_tower(
                config["embed_dim"], vision, quick_gelu=config.get("quick_gelu", False)
            )
            return visual.eval(), "image tower only (HF text tower not built offline)"
        model = open_clip.create_model(
            name, pretrained=None, **{k: v for k, v in config.items() if k.endswith("_cfg")}
        )
    return model.eval(), type(model).__name__


def _image_size(model: torch.nn.Module) -> Tuple[int, int]:
    visual: Any = getattr(model, "visual", model)
    size = getattr(visual, "image_size", 224)
    if isinstance(size, (tuple, list)):
        return int(size[0]), int(size[1])
    return int(size), int(size)


def _state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def check(model: torch.nn.Module) -> str:
    """Run LeGrad once on ``model``; the detail of a ``works`` row (raises otherwise)."""
    from captum_legrad import LeGrad, discover

    spec = discover(model)
    height, width = _image_size(model)
    x = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    before = _state(model)
    explained = explainable(model, x, spec)  # an embedding: its dimensions
    maps = LeGrad(explained).attribute(x, target=0, output="grid", normalize=False)
    grid = spec.grid_size(height, width)
    if maps.shape != (1, 1, *grid):
        raise AssertionError(f"map of shape {tuple(maps.shape)}, expected {(1, 1, *grid)}")
    if not bool(torch.isfinite(maps).all()):
        raise AssertionError("the map is not finite")
    if not bool(maps.max() > maps.min()):
        raise AssertionError("the map is constant")
    after = _state(model)
    if before.keys() != after.keys() or any(not torch.equal(before[k], after[k]) for k in before):
        raise AssertionError("the model changed")
    pool = "attention pool" if spec.pool_attention is not None else "token readout"
    return (
        f"{type(spec.root).__name__}, {spec.num_prefix_tokens} prefix, "
        f"{grid[0]}x{grid[1]} patches at {height}x{width}, {pool}"
    )


def sweep_one(name: str) -> Row:
    """``(family, name, status, detail)`` of one configuration."""
    from captum_legrad import UnsupportedModelError

    start = time.perf_counter()
    built = "?"
    try:
        with _time_limit(TIME_LIMIT_S):
            model, built = _build(name)
            detail = check(model)
        status = "works"
        detail = f"{detail}; {built}, {LAYERS} blocks"
    except UnsupportedModelError as error:
        status, detail = "refused", str(error).split(". ")[0]
    except Exception as error:
        status, detail = "error", f"{type(error).__name__}: {error}"[:300]
    detail = f"{detail} ({time.perf_counter() - start:.1f} s)"
    return ("open_clip", name, status, detail.replace("\n", " ").replace("|", "/"))


def sweep_open_clip(names: Optional[Sequence[str]] = None) -> List[Row]:
    """Rows ``(family, name, status, detail)`` for every ``open_clip.list_models()`` config.

    ``status`` is ``"works"``, ``"refused"`` or ``"error"``.
    """
    import open_clip

    torch.manual_seed(0)
    return [sweep_one(name) for name in (names or open_clip.list_models())]


def markdown(rows: Sequence[Row]) -> str:
    """The rows as a Markdown table, with the fractions below it."""
    lines = ["| family | name | status | detail |", "|---|---|---|---|"]
    lines += [
        f"| {family} | `{name}` | {status} | {detail} |" for family, name, status, detail in rows
    ]
    total = len(rows)
    counts = {s: sum(1 for r in rows if r[2] == s) for s in ("works", "refused", "error")}
    lines.append("")
    lines.append(
        ", ".join(f"{status}: {n}/{total}" for status, n in counts.items())
        + (f" (works {counts['works'] / total:.0%})" if total else "")
    )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="configuration names (default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    rows = []
    import open_clip

    for name in args.only or open_clip.list_models():
        rows.append(sweep_one(name))
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
