"""LeGrad on one NVIDIA GPU: images/second and peak memory vs a forward and Captum Saliency.

Not yet run on a GPU (issue #11 goals: LeGrad images/s ÷ forward images/s ≥ 0.5 and
≥ 2000 images/s for ViT-B/16 bf16 on an H100-class card); ``--smoke`` runs the same code
on the CPU with a tiny model.

    python3 benchmarks/bench_gpu.py                    # ViT-B/16 and ViT-L/14, bf16 + autocast
    python3 benchmarks/bench_gpu.py --smoke            # the same code path on CPU, seconds

Self-contained (torch, timm, numpy, captum, captum_legrad and the standard library; no
network, random init). For each model, precision and batch size (1, 8, 32, 64, 128) it
times, CUDA-synchronised, after warm-up, alternating round-robin:

* ``forward``: ``model(x)`` under ``torch.no_grad()``;
* ``LeGrad``: ``LeGrad(model).attribute(x, target=t)``, all layers, one target per image
  (the lean route, the default);
* ``LeGrad-explicit``: the same with ``route="explicit"`` (batches up to
  ``--explicit-max-batch``);
* ``Saliency``: Captum's ``Saliency(model).attribute(x, target=t)``;

then, for the first model in bf16 at batch 1, the issue's ratios against the input size
(``--sizes``, ``dynamic_img_size=True``): LeGrad ÷ forward time and the peak memory above
the model of one call (1 target; 8 targets by ``attribute_multi`` at the largest size).
It reports images/second (batch ÷ median seconds) and the peak of
``torch.cuda.max_memory_allocated`` in one call of each (reset before each). Precisions:
the model and inputs cast to ``--dtype`` (bf16 by default), and with ``--autocast`` (on by
default on CUDA) the float32 model under ``torch.autocast(dtype=bfloat16)``. A method that
runs out of memory is marked OOM at that batch size and skipped at larger ones. Each cell is
capped in time (``--cell-seconds``) and the whole run by ``--budget-s``, so that one call on
an H100 ends in a few minutes. Prints a Markdown table and writes it to ``$OUT/gpu_table.md``
when ``$OUT`` is set (or to ``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import importlib.metadata
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence, Tuple

# captum_legrad from the working tree this script lives in (it travels to the device machine).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import timm
import torch
from captum.attr import Saliency
from torch import Tensor, nn

from captum_legrad import LeGrad

METHODS = ("forward", "LeGrad", "LeGrad-explicit", "Saliency")
#: Issue #11: LeGrad images/s ÷ forward images/s, and LeGrad images/s (ViT-B/16, bf16).
GOAL_RATIO, GOAL_RATE = 0.5, 2000.0
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


class Bench:
    """Timing and memory on one device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def call_seconds(self, fn: Callable[[], object]) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start

    def peak_gib(self, fn: Callable[[], object]) -> Optional[float]:
        """``max_memory_allocated`` during one call (weights and input included), in GiB.

        The call also runs on the CPU (as the first warm-up), where there is no figure.
        """
        if not self.cuda:
            fn()
            return None
        self.sync()
        torch.cuda.reset_peak_memory_stats(self.device)
        fn()
        self.sync()
        return torch.cuda.max_memory_allocated(self.device) / 2**30

    def time_round_robin(
        self,
        fns: Dict[str, Callable[[], object]],
        warmup: int,
        max_repeats: int,
        min_repeats: int,
        cell_seconds: float,
    ) -> Dict[str, List[float]]:
        for fn in fns.values():
            for _ in range(warmup):
                self.call_seconds(fn)
        times: Dict[str, List[float]] = {name: [] for name in fns}
        start = time.perf_counter()
        for i in range(max_repeats):
            for name, fn in fns.items():
                times[name].append(self.call_seconds(fn))
            if i + 1 >= min_repeats and time.perf_counter() - start > cell_seconds:
                break
        return times


def build_model(name: str) -> nn.Module:
    """Random init, float32, on the CPU (each precision gets a copy on the device)."""
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval()


def method_fns(
    model: nn.Module,
    x: Tensor,
    targets: Tensor,
    precision: Callable[[], ContextManager[Any]],
    explicit: bool = True,
) -> Dict[str, Callable[[], object]]:
    legrad = LeGrad(model)
    legrad_explicit = LeGrad(model, route="explicit")
    saliency = Saliency(model)

    def forward() -> object:
        with torch.no_grad(), precision():
            return model(x)

    def run_legrad() -> object:
        with precision():
            return legrad.attribute(x, target=targets)

    def run_legrad_explicit() -> object:
        with precision():
            return legrad_explicit.attribute(x, target=targets)

    def run_saliency() -> object:
        with precision():
            return saliency.attribute(x, target=targets)

    fns = {"forward": forward, "LeGrad": run_legrad}
    if explicit:
        fns["LeGrad-explicit"] = run_legrad_explicit
    fns["Saliency"] = run_saliency
    return fns


Row = Dict[str, Any]


def bench_cell(
    bench: Bench,
    model: nn.Module,
    input_size: Tuple[int, int],
    batch: int,
    input_dtype: torch.dtype,
    precision: Callable[[], ContextManager[Any]],
    skip: Dict[str, str],
    args: argparse.Namespace,
) -> Row:
    """One (model, precision, batch) cell: images/s and peak GiB per method."""
    row: Row = {"batch": batch}
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 3, *input_size, generator=g).to(bench.device, input_dtype)
    num_classes = int(getattr(model, "num_classes", 1000))
    targets = (torch.arange(batch) * 37 % num_classes).to(bench.device)
    fns = method_fns(model, x, targets, precision, batch <= args.explicit_max_batch)
    live: Dict[str, Callable[[], object]] = {}
    for name, fn in fns.items():
        if name in skip:
            row[name] = skip[name]
            continue
        try:
            row[f"{name}_gib"] = bench.peak_gib(fn)  # also the first warm-up call
            live[name] = fn
        except Exception as err:
            if not is_oom(err):
                raise
            skip[name] = f"OOM at {batch}"
            row[name] = "OOM"
            bench.free()
    if live:
        try:
            times = bench.time_round_robin(
                live, args.warmup, args.max_repeats, args.min_repeats, args.cell_seconds
            )
        except Exception as err:
            if not is_oom(err):
                raise
            bench.free()
            for name in live:
                row[name] = "OOM"
            return row
        for name, values in times.items():
            med = statistics.median(values)
            row[f"{name}_s"] = med
            row[f"{name}_n"] = len(values)
            row[name] = batch / med
    del x, fns, live
    bench.free()
    return row


def fmt_rate(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def fmt_gib(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}"


def fmt_ratio(row: Row, a: str, b: str) -> str:
    if f"{a}_s" in row and f"{b}_s" in row:
        return f"{row[f'{a}_s'] / row[f'{b}_s']:.2f}×"
    return "-"


def table(rows: Sequence[Row]) -> str:
    headers = [
        "model",
        "precision",
        "batch",
        "forward img/s",
        "LeGrad img/s",
        "LeGrad-explicit img/s",
        "Saliency img/s",
        "LeGrad ÷ forward (time)",
        "LeGrad ÷ Saliency (time)",
        "peak GiB forward / LeGrad / explicit / Saliency",
        "rounds",
    ]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        if "note" in row:
            cells = [row["model"], row["precision"], str(row["batch"]), row["note"]]
            cells += [""] * (len(headers) - len(cells))
        else:
            peaks = " / ".join(fmt_gib(row.get(f"{m}_gib")) for m in METHODS)
            rounds = str(max((row.get(f"{m}_n", 0) for m in METHODS), default=0))
            cells = [
                row["model"],
                row["precision"],
                str(row["batch"]),
                *(fmt_rate(row.get(m)) for m in METHODS),
                fmt_ratio(row, "LeGrad", "forward"),
                fmt_ratio(row, "LeGrad", "Saliency"),
                peaks,
                rounds,
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def header(args: argparse.Namespace, device: torch.device) -> List[str]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        what = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    else:
        what = (
            f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"
        )
    return [
        "# captum_legrad GPU benchmark",
        "",
        f"- device: {what}",
        f"- torch {torch.__version__}, timm {timm.__version__}, captum {version('captum')}, "
        f"numpy {np.__version__}, Python {platform.python_version()}; "
        f"{datetime.datetime.now():%Y-%m-%d %H:%M}",
        "- random init, 224² inputs (the models' own size), one target per image; CUDA-"
        f"synchronised wall time of each call, {args.warmup} warm-up calls each, then the "
        "methods alternate round-robin until the cell has run "
        f"{args.cell_seconds:.1f} s (at least {args.min_repeats}, at most {args.max_repeats} "
        "rounds); medians. img/s = batch ÷ median seconds",
        "- forward: `model(x)` under `torch.no_grad()`; LeGrad: `LeGrad(model).attribute(x, "
        'target=t)` (all layers, lean route); LeGrad-explicit: `route="explicit"` (batch ≤ '
        f"{args.explicit_max_batch}); Saliency: Captum `Saliency(model).attribute(x, target=t)`",
        "- peak: `torch.cuda.max_memory_allocated` during one call, reset before it (model "
        "weights and input included)",
        f"- precision `{SHORT[args.dtype]}`: model and input cast to {args.dtype}; `autocast`: "
        "float32 model and input under `torch.autocast(dtype=torch.bfloat16)`",
        "",
    ]


def goal_lines(rows: Sequence[Row], model_name: str, precision: str) -> List[str]:
    """The issue's throughput goals, from the best batch of ``model_name`` in ``precision``."""
    cells = [
        r
        for r in rows
        if r.get("model") == model_name
        and r.get("precision") == precision
        and isinstance(r.get("LeGrad"), float)
        and isinstance(r.get("forward"), float)
    ]
    if not cells:
        return [f"- goals: no {model_name} {precision} cell measured"]
    best = max(cells, key=lambda r: r["LeGrad"])
    rate, share = best["LeGrad"], best["LeGrad"] / best["forward"]
    return [
        f"- goal, {model_name} {precision}: LeGrad images/s ÷ forward images/s = {share:.2f} "
        f"(≥ {GOAL_RATIO}: {'yes' if share >= GOAL_RATIO else 'no'}), {rate:,.0f} images/s "
        f"(≥ {GOAL_RATE:,.0f}: {'yes' if rate >= GOAL_RATE else 'no'}), at batch {best['batch']}"
        " (the rate goal is for an H100-class GPU)"
    ]


def size_section(
    bench: Bench, name: str, dtype: torch.dtype, args: argparse.Namespace
) -> List[str]:
    """LeGrad ÷ forward and peak memory above the model against the input size, batch 1."""
    torch.manual_seed(0)
    model: Any = timm.create_model(name, pretrained=False, dynamic_img_size=True).eval()
    model = model.to(device=bench.device, dtype=dtype)
    patch = int(model.patch_embed.patch_size[0])
    legrad = LeGrad(model)
    rows = []
    for size in args.sizes:
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(size))
        x = x.to(bench.device, dtype)

        def forward(x: Tensor = x) -> object:
            with torch.no_grad():
                return model(x)

        def one(x: Tensor = x) -> object:
            return legrad.attribute(x, target=3)

        def eight(x: Tensor = x) -> object:
            return legrad.attribute_multi(x, targets=range(8))

        fns: Dict[str, Callable[[], object]] = {"forward": forward, "LeGrad": one}
        if size == max(args.sizes):
            fns["LeGrad, 8 targets"] = eight
        row: Dict[str, Any] = {"size": size, "tokens": (size // patch) ** 2 + 1}
        live = {}
        for label, fn in fns.items():
            try:
                bench.sync()
                base = torch.cuda.memory_allocated(bench.device) if bench.cuda else 0
                peak = bench.peak_gib(fn)
                row[f"{label}_gib"] = None if peak is None else peak - base / 2**30
                live[label] = fn
            except Exception as err:
                if not is_oom(err):
                    raise
                row[f"{label}_gib"] = "OOM"
                bench.free()
        times = bench.time_round_robin(
            live, args.warmup, args.max_repeats, args.min_repeats, args.cell_seconds
        )
        for label, values in times.items():
            row[f"{label}_s"] = statistics.median(values)
        rows.append(row)
        del x, fns, live
        bench.free()

    def gib(value: Any) -> str:
        return value if isinstance(value, str) else fmt_gib(value)

    headers = ["size", "tokens", "forward s", "LeGrad s", "LeGrad ÷ forward"]
    headers += ["peak GiB above model: forward / LeGrad / LeGrad 8 targets"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        fwd, lg = row.get("forward_s"), row.get("LeGrad_s")
        ratio_text = f"{lg / fwd:.2f}×" if fwd and lg else "-"
        peaks = " / ".join(
            gib(row.get(f"{m}_gib")) for m in ("forward", "LeGrad", "LeGrad, 8 targets")
        )
        cells = [f"{row['size']}²", str(row["tokens"])]
        cells += ["-" if fwd is None else f"{fwd:.4f}", "-" if lg is None else f"{lg:.4f}"]
        cells += [ratio_text, peaks]
        lines.append("| " + " | ".join(cells) + " |")
    return [
        f"## Input size: `{name}` ({SHORT[args.dtype]}), batch 1, all layers, lean route",
        "",
        "Goals (issue #11, measured there on CPU): LeGrad ÷ forward ≤ 1.5× at 224², ≤ 1.8× "
        "at 672²; peak above the model ≤ 1.5 GiB at 896² (1 target), ≤ 4 GiB at 1024² (8 "
        "targets). Peak: `max_memory_allocated` during the call minus the memory allocated "
        "before it (model and input).",
        "",
        *lines,
    ]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--models", nargs="+", default=["vit_base_patch16_224", "vit_large_patch14_224"]
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256])
    parser.add_argument(
        "--explicit-max-batch",
        type=int,
        default=8,
        help="time the explicit route up to this batch (8)",
    )
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[224, 672, 896, 1024],
        help="input sizes of the size table (first model, batch 1); none to skip",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument(
        "--autocast",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also a float32 model under bf16 autocast (default: on for CUDA, off for CPU)",
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--min-repeats", type=int, default=3)
    parser.add_argument("--max-repeats", type=int, default=20)
    parser.add_argument("--cell-seconds", type=float, default=1.5, help="timing cap per cell")
    parser.add_argument("--budget-s", type=float, default=360.0, help="skip cells after this")
    parser.add_argument("--out", type=Path, help="write the table here (default $OUT/gpu_table.md)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="CPU smoke test: --device cpu --models vit_tiny_patch16_224 --batch-sizes 1 2 "
        "--sizes 32 64 --dtype float32, one round",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.device, args.models, args.batch_sizes = "cpu", ["vit_tiny_patch16_224"], [1, 2]
        args.dtype, args.warmup, args.min_repeats, args.max_repeats = "float32", 1, 1, 1
        args.sizes = [32, 64]
    if args.autocast is None:
        args.autocast = args.device.startswith("cuda")
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*required_grads has been set automatically.*")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu (or --smoke) here")
    bench = Bench(device)
    started = time.perf_counter()
    dtype = DTYPES[args.dtype]
    autocast_type = "cuda" if device.type == "cuda" else "cpu"
    precisions: List[Tuple[str, torch.dtype, Callable[[], ContextManager[Any]]]] = [
        (SHORT[args.dtype], dtype, contextlib.nullcontext)
    ]
    if args.autocast:
        precisions.append(
            (
                "autocast bf16",
                torch.float32,
                lambda: torch.autocast(autocast_type, dtype=torch.bfloat16),
            )
        )
    lines = header(args, device)
    print("\n".join(lines), flush=True)
    rows: List[Row] = []
    for name in args.models:
        cpu_model = build_model(name)
        for label, model_dtype, precision in precisions:
            model: Any = copy.deepcopy(cpu_model).to(device=device, dtype=model_dtype)
            size = tuple(model.patch_embed.img_size)
            skip: Dict[str, str] = {}
            for batch in args.batch_sizes:
                base = {"model": name, "precision": label, "batch": batch}
                if time.perf_counter() - started > args.budget_s:
                    rows.append({**base, "note": f"skipped: over --budget-s {args.budget_s:.0f}"})
                    continue
                row = bench_cell(bench, model, size, batch, model_dtype, precision, skip, args)
                rows.append({**base, **row})
                print(table(rows[-1:]).splitlines()[-1], flush=True)
            del model
            bench.free()
        del cpu_model
    extra = goal_lines(rows, args.models[0], SHORT[args.dtype])
    if args.sizes:
        extra += ["", *size_section(bench, args.models[0], dtype, args)]
    minutes = (time.perf_counter() - started) / 60
    text = "\n".join([*lines, table(rows), "", *extra, "", f"Total {minutes:.1f} min."]) + "\n"
    print("\n" + text, flush=True)
    out = args.out
    if out is None and os.environ.get("OUT"):
        out = Path(os.environ["OUT"]) / "gpu_table.md"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"written: {out}")


if __name__ == "__main__":
    main()
