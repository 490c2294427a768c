"""LeGrad on a ViT-B-shaped video model (issue #22): cost ratio and peak memory in frames.

    python benchmarks/bench_video.py --out benchmarks/results_video.md \\
        --plot benchmarks/results_video.png                                     # ~10 min
    python benchmarks/bench_video.py --quick                                    # smoke run

The model is HF ``VideoMAEForVideoClassification`` with VideoMAE-base's configuration
(12 layers, width 768, 12 heads, patches 16², tubelets of 2 frames, mean pooling), random
init, batch 1, ``torch.set_num_threads(2)`` unless ``--threads`` says otherwise:

* cost at 16 frames × 224² (8 × 14 × 14 = 1,568 tokens): LeGrad (all layers, 1 target,
  default lean route) ÷ a plain no-grad forward, alternated round-robin after one warm-up
  call each (ratios of medians, so load from other processes hits both alike); the
  FLOP ratio (``torch.utils.flop_counter`` formulas) beside it;
* peak memory for 4, 8, 16 and 32 frames (392 to 3,136 tokens) of a 4-layer model of the
  same shape (``--memory-layers``; 12 layers at 32 frames take minutes per call on a shared
  2-core machine), each (frames, method) once
  in a fresh process: the kernel's ``VmHWM``, reset to the current RSS after the model, the
  input and the explainer are built (``bench_cpu.py``'s method), so the number is what the
  call adds; with a text plot and, where matplotlib is installed, a PNG (``--plot``).

Defaults keep one run near 10 minutes on a shared 2-core machine: 2 timed repeats, FLOPs
counted on a 2-layer model (``--flop-layers``), the memory table at 4 layers.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # the benchmarks folder is not a package
    RESULT_PREFIX,
    call_subprocess,
    current_rss_mib,
    ensure_repo_on_path,
    flop_counts,
    load_average,
    machine_line,
    markdown_table,
    medians,
    peak_rss_mib,
    reset_peak_rss,
    round_robin,
    today,
)

ensure_repo_on_path()

GOAL = 1.8
Fn = Callable[[], object]


def build(frames: int, layers: int, size: int = 224) -> Tuple[nn.Module, Tensor]:
    """VideoMAE-base-shaped classifier (random init) and one video ``(1, T, 3, H, W)``."""
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    config = VideoMAEConfig(
        image_size=size,
        patch_size=16,
        num_frames=frames,
        tubelet_size=2,
        hidden_size=768,
        num_hidden_layers=layers,
        num_attention_heads=12,
        intermediate_size=3072,
        use_mean_pooling=True,
        num_labels=400,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = VideoMAEForVideoClassification(config).eval()
    video = torch.randn(1, frames, 3, size, size, generator=torch.Generator().manual_seed(1))
    return model, video


def method(name: str, model: nn.Module, video: Tensor) -> Fn:
    from captum_legrad import LeGrad

    if name == "forward":

        def forward() -> None:
            with torch.no_grad():
                model(video)

        return forward
    legrad = LeGrad(model)
    return lambda: legrad.attribute(video, target=3)


def emit(result: Dict[str, Any]) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_worker(args: argparse.Namespace) -> None:
    """Peak RSS of one method at one frame count, in this fresh process."""
    torch.set_num_threads(args.threads)
    model, video = build(args.frames, args.memory_layers)
    fn = method(args.worker, model, video)
    gc.collect()
    reset = reset_peak_rss()
    base = current_rss_mib()
    start = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - start
    emit(
        {
            "method": args.worker,
            "frames": args.frames,
            "base_mib": base,
            "peak_mib": peak_rss_mib(),
            "reset": reset,
            "seconds": elapsed,
        }
    )


def log(message: str) -> None:
    print(f"[bench_video {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cost_section(args: argparse.Namespace) -> List[str]:
    torch.set_num_threads(args.threads)
    model, video = build(args.frames, args.layers)
    tokens = (args.frames // 2) * (224 // 16) ** 2
    fns = {name: method(name, model, video) for name in ("forward", "legrad")}
    log(f"cost: {args.frames} frames, {tokens} tokens, {args.repeats} repeats")
    load_before = load_average()
    times = round_robin(fns, args.repeats)
    load_after = load_average()
    med = medians(times)
    del fns, model
    log(f"FLOPs: {args.flop_layers} layers")
    small, video = build(args.frames, args.flop_layers)
    flops = flop_counts({name: method(name, small, video) for name in ("forward", "legrad")})
    # torch's flop formulas do not count the CPU sdpa kernel: add its 4·N²·D per layer (the
    # attention both calls run once, forward only) by hand
    attention = 4.0 * tokens**2 * 768 * args.flop_layers
    flops = {name: count + attention for name, count in flops.items()}
    ratio = med["legrad"] / med["forward"]
    met = "yes" if ratio <= GOAL else "**no**"
    rows = [
        [
            "no-grad forward",
            f"{med['forward']:.2f}",
            "1.00×",
            f"{flops['forward'] / 1e9:.0f}",
            "1.00×",
        ],
        [
            "LeGrad, all layers, 1 target",
            f"{med['legrad']:.2f}",
            f"{ratio:.2f}×",
            f"{flops['legrad'] / 1e9:.0f}",
            f"{flops['legrad'] / flops['forward']:.2f}×",
        ],
    ]
    return [
        f"## Cost: {args.frames} frames × 224² ({tokens:,} tokens), {args.layers} layers",
        "",
        f"Median of {args.repeats} calls each, alternated round-robin after one warm-up call; "
        f"load average {load_before} before, {load_after} after.",
        "",
        markdown_table(["call", "median, s", "÷ forward", "GFLOP", "FLOP ÷ forward"], rows),
        "",
        f"- goal: LeGrad ÷ no-grad forward ≤ {GOAL}×: {ratio:.2f}×: {met}",
        f"- the FLOP columns count a {args.flop_layers}-layer model of the same shape (one "
        "more forward and LeGrad call of the full model would take minutes on this machine); "
        "the ratio is per layer, so it barely depends on the depth. They are "
        "`torch.utils.flop_counter`'s formulas plus the attention's `4·N²·D` per layer, "
        "which the formulas do not count for the CPU `sdpa` kernel (both calls run it once).",
        "",
    ]


def memory_section(args: argparse.Namespace) -> Tuple[List[str], Dict[Tuple[int, str], float]]:
    jobs = [(frames, name) for frames in args.memory_frames for name in ("forward", "legrad")]
    log(f"memory: {len(jobs)} worker processes, one at a time")
    peaks: Dict[Tuple[int, str], float] = {}
    seconds_of: Dict[Tuple[int, str], float] = {}
    errors: Dict[Tuple[int, str], str] = {}
    for frames, name in jobs:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--threads",
            str(args.threads),
            "--memory-layers",
            str(args.memory_layers),
            "--worker",
            name,
            "--frames",
            str(frames),
        ]
        result, error = call_subprocess(cmd, timeout=args.subprocess_timeout)
        if result is None:
            errors[(frames, name)] = error
            log(f"  {frames} frames {name}: {error}")
            continue
        peaks[(frames, name)] = result["peak_mib"] - result["base_mib"]
        seconds_of[(frames, name)] = result["seconds"]
        log(f"  {frames} frames {name}: {peaks[(frames, name)]:.0f} MiB")

    def cell(job: Tuple[int, str]) -> str:
        if job in peaks:
            return f"{peaks[job]:.0f}"
        return f"failed: {errors[job]}" if job in errors else "not run"

    rows = []
    for frames in args.memory_frames:
        tokens = (frames // 2) * 14 * 14
        per_frame = ""
        if (frames, "legrad") in peaks:
            per_frame = f"{peaks[(frames, 'legrad')] / frames:.1f}"
        rows.append(
            [
                str(frames),
                f"{tokens:,}",
                cell((frames, "forward")),
                cell((frames, "legrad")),
                per_frame,
                f"{seconds_of.get((frames, 'legrad'), float('nan')):.1f}",
            ]
        )
    lines = [
        f"## Peak memory against the number of frames ({args.memory_layers} layers)",
        "",
        "Each (frames, method) once in a fresh process; peak RSS (`VmHWM`) above the RSS with "
        "the model, the video and the explainer built.",
        "",
        markdown_table(
            [
                "frames",
                "tokens",
                "forward, MiB",
                "LeGrad, MiB",
                "LeGrad MiB / frame",
                "LeGrad call, s",
            ],
            rows,
        ),
        "",
        *text_plot(args.memory_frames, peaks),
    ]
    return lines, peaks


def text_plot(frames: Sequence[int], peaks: Dict[Tuple[int, str], float]) -> List[str]:
    values = [v for v in peaks.values() if v > 0]
    if not values:
        return []
    step = max(values) / 60
    lines = ["```", f"peak RSS above the model, MiB (one # = {step:.0f} MiB)"]
    for count in frames:
        for name, label in (("forward", "forward"), ("legrad", "LeGrad ")):
            if (count, name) in peaks:
                value = peaks[(count, name)]
                bar = "#" * max(1, round(value / step)) if value > 0 else ""
                lines.append(f"{count:>3} frames {label} {bar} {value:.0f}")
    lines.append("```")
    return lines


def png_plot(path: str, frames: Sequence[int], peaks: Dict[Tuple[int, str], float]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    for name, label in (("forward", "no-grad forward"), ("legrad", "LeGrad (lean)")):
        xs = [f for f in frames if (f, name) in peaks]
        ax.plot(xs, [peaks[(f, name)] for f in xs], marker="o", label=label)
    ax.set_xlabel("frames (224², tubelets of 2)")
    ax.set_ylabel("peak RSS above the model, MiB")
    ax.set_xticks(list(frames))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--flop-layers", type=int, default=2)
    parser.add_argument("--memory-frames", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--memory-layers", type=int, default=4)
    parser.add_argument("--subprocess-timeout", type=float, default=300)
    parser.add_argument("--quick", action="store_true", help="2 layers, 2 repeats, 4 and 8 frames")
    parser.add_argument("--out", help="write the Markdown here too")
    parser.add_argument("--plot", help="write a PNG of the memory table here")
    parser.add_argument("--worker", choices=["forward", "legrad"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args)
        return
    if args.quick:
        args.layers, args.repeats, args.memory_layers, args.flop_layers = 2, 2, 2, 1
        args.memory_frames = [4, 8]
    import transformers

    header = [
        "# LeGrad on a video Vision Transformer",
        "",
        f"{today()}; {machine_line()}; torch {torch.__version__}, transformers "
        f"{transformers.__version__}; {args.threads} threads; load average at start "
        f"{load_average()}.",
        "",
        "HF `VideoMAEForVideoClassification` with VideoMAE-base's configuration (width 768, "
        "12 heads, 16² patches, tubelets of 2 frames, mean pooling), random init, sdpa "
        "attention, batch 1, `python benchmarks/bench_video.py"
        + (" --quick" if args.quick else "")
        + "`.",
        "",
    ]
    lines = header + cost_section(args)
    memory, peaks = memory_section(args)
    lines += memory
    if args.plot and png_plot(args.plot, args.memory_frames, peaks):
        lines += ["", f"![peak memory against frames]({Path(args.plot).name})"]
    lines += ["", f"Load average at the end: {load_average()}."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
