"""LeGrad on CPU: cost ratios, the reference package, Grad-CAM, peak memory and scaling.

    python benchmarks/bench_cpu.py --quick                      # smoke run, < 3 min idle
    python benchmarks/bench_cpu.py \\
        --reference-python /work/refvenv/bin/python --out out/bench_cpu.md   # full, ~15 min

Every table is measured in this one run: the callables compared in a table alternate
round-robin after one warm-up call each, and the ratios are ratios of medians, so load
from other processes hits every entry alike. Random init, batch 1, ``torch.set_num_threads(2)``
unless ``--threads`` says otherwise. Prints Markdown (and writes it with ``--out``):

* cost (timm ``vit_base_patch16_224``, 224²): LeGrad all layers and last two layers ÷ a
  plain no-grad forward, ÷ Captum ``Saliency``, ÷ ``grad-cam``'s ``GradCAM``;
  ``attribute_multi`` with K targets ÷ K single ``attribute`` calls (K = 1, 8, 64);
* ours ÷ ``legrad-torch`` 1.1 on OpenCLIP ViT-B-16 (``layers=[-2, -1]``, 1 and 8 prompts),
  in a subprocess run by ``--reference-python`` (the venv of ``scripts/reference_env.sh``);
* peak memory of each method, each in a fresh subprocess (``--worker METHOD``);
* scaling with the input size (``dynamic_img_size=True``) and with the number of layers;
  the lean route (default) and the explicit route (``route="explicit"``) side by side;
* peak memory against the number of tokens (224² to 1024²), each size and route in a fresh
  subprocess (``--worker size_METHOD --size S``), with a text plot.

``--profile`` instead profiles one LeGrad call with ``torch.profiler`` (phases and top ops).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import importlib.metadata
import importlib.util
import io
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

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
    maxrss_mib,
    medians,
    peak_rss_mib,
    ratio,
    reset_peak_rss,
    round_robin,
    seconds,
    today,
)

ensure_repo_on_path()

os.environ.setdefault("HF_HUB_OFFLINE", "1")

Fn = Callable[[], object]

#: Methods measured by ``--worker`` in the main interpreter (timm model).
TIMM_WORKERS = ("forward", "legrad_all", "legrad_last2", "saliency", "gradcam", "multi8", "multi64")
#: Methods measured by ``--worker`` in the reference interpreter (OpenCLIP model).
CLIP_WORKERS = ("clip_forward", "ours_clip1", "ref_clip1", "ours_clip8", "ref_clip8")

GOALS = {
    "all_layers": 1.5,  # LeGrad, all layers ÷ forward, 224² (issue #11)
    "multi8": 0.55,  # 8 targets ÷ eight single calls
    "ref1": 0.9,  # ours ÷ legrad-torch, 1 prompt (issue #11)
    "ref8": 0.2,  # ours ÷ legrad-torch, 8 prompts (issue #11)
}
#: Issue #11, scaling with the input size: LeGrad ÷ forward at 672²; peak memory above the
#: model at 896² (1 target) and at 1024² (8 targets by attribute_multi), MiB.
SIZE_GOALS = {"ratio_672": 1.8, "mem_896": 1.5 * 1024, "mem_1024_multi8": 4.0 * 1024}
FLOP_NOTE = "counted once per callable with `torch.utils.flop_counter`'s formulas"
#: Memory workers per input size (``--worker size_METHOD --size S``).
SIZE_WORKERS = ("size_forward", "size_lean", "size_explicit", "size_multi8")


# --------------------------------------------------------------------------- models


def version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def build_timm(name: str, dynamic: bool = False) -> nn.Module:
    import timm

    torch.manual_seed(0)
    kwargs: Dict[str, Any] = {"dynamic_img_size": True} if dynamic else {}
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def timm_input(model: nn.Module, size: Optional[int] = None) -> Tensor:
    if size is None:
        vit: Any = model
        img_size = vit.patch_embed.img_size
        size = int(img_size[0] if isinstance(img_size, (tuple, list)) else img_size)
    torch.manual_seed(1)
    return torch.randn(1, 3, size, size)


def gradcam_available() -> bool:
    return importlib.util.find_spec("pytorch_grad_cam") is not None


def make_gradcam(model: nn.Module, x: Tensor, target: int) -> Fn:
    """``grad-cam``'s GradCAM on the last block's ``norm1`` with a ViT reshape transform."""
    from pytorch_grad_cam import GradCAM  # type: ignore[import-untyped,import-not-found,unused-ignore]
    from pytorch_grad_cam.utils.model_targets import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
        ClassifierOutputTarget,
    )

    vit: Any = model
    n_prefix = int(vit.num_prefix_tokens)
    g_h, g_w = vit.patch_embed.dynamic_feat_size(x.shape[-2:])

    def reshape_transform(tokens: Tensor) -> Tensor:
        patches = tokens[:, n_prefix:, :]
        return patches.reshape(tokens.shape[0], g_h, g_w, tokens.shape[-1]).permute(0, 3, 1, 2)

    cam = GradCAM(
        model=model, target_layers=[vit.blocks[-1].norm1], reshape_transform=reshape_transform
    )
    targets = [ClassifierOutputTarget(target)]
    return lambda: cam(input_tensor=x, targets=targets)


def timm_method(name: str, model: nn.Module, x: Tensor, *, own_copy: bool = False) -> Fn:
    """The callable for one timm method; ``own_copy`` gives hook-installing methods a copy."""
    from captum.attr import Saliency

    from captum_legrad import LeGrad

    vit: Any = model
    depth = len(vit.blocks)
    target = 3

    def forward() -> None:
        with torch.no_grad():
            model(x)

    if name == "forward":
        return forward
    if name.startswith("legrad_"):
        which = name[len("legrad_") :]
        route = "lean"
        if which.endswith("_explicit"):
            which, route = which[: -len("_explicit")], "explicit"
        layers = None if which == "all" else list(range(-int(which[len("last") :]), 0))
        if layers is not None and len(layers) >= depth:
            layers = None
        legrad = LeGrad(model, layers, route=route)
        return lambda: legrad.attribute(x, target=target)
    if name.startswith("multi"):
        k = int(name[len("multi") :].split("_")[0])
        legrad = LeGrad(model, route="explicit" if name.endswith("_explicit") else "lean")
        return lambda: legrad.attribute_multi(x, targets=list(range(k)))
    if name.startswith("singles"):
        k = int(name[len("singles") :])
        legrad = LeGrad(model)

        def singles() -> None:
            for t in range(k):
                legrad.attribute(x, target=t)

        return singles
    if name == "saliency":
        saliency = Saliency(model)
        leaf = x.clone().requires_grad_()
        return lambda: saliency.attribute(leaf, target=target)
    if name == "gradcam":
        return make_gradcam(copy.deepcopy(model) if own_copy else model, x, target)
    raise ValueError(f"unknown timm method {name!r}")


def build_clip(name: str) -> Tuple[nn.Module, Tensor, Dict[int, Tensor]]:
    """A random-init OpenCLIP model, one image and normalised random text embeddings."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None).eval()
    visual: Any = model.visual
    size = visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    dim = int(visual.proj.shape[1])
    x = torch.randn(1, 3, size, size)
    texts = {k: torch.nn.functional.normalize(torch.randn(k, dim), dim=-1) for k in (1, 8)}
    return model, x, texts


def clip_method(
    name: str, model: nn.Module, x: Tensor, texts: Dict[int, Tensor], *, own_copy: bool = False
) -> Fn:
    """Ours (``ImageTextSimilarity`` + ``LeGrad(layers=[-2, -1])``) or ``legrad-torch``."""
    clip: Any = model
    if name == "clip_forward":

        def encode() -> None:
            with torch.no_grad():
                clip.encode_image(x)

        return encode
    k = int(name[-1])
    if name.startswith("ours_clip"):
        from captum_legrad import ImageTextSimilarity, LeGrad

        legrad = LeGrad(ImageTextSimilarity(model, texts[k]), layers=[-2, -1])
        if k == 1:
            return lambda: legrad.attribute(x, target=0)
        return lambda: legrad.attribute_multi(x, targets=list(range(k)))
    if name.startswith("ref_clip"):
        from legrad import LeWrapper  # type: ignore[import-untyped,import-not-found,unused-ignore]

        with contextlib.redirect_stdout(io.StringIO()):  # it prints on construction
            wrapper: Any = LeWrapper(copy.deepcopy(model) if own_copy else model, layer_index=-2)
        return lambda: wrapper.compute_legrad(text_embedding=texts[k], image=x)
    raise ValueError(f"unknown OpenCLIP method {name!r}")


# --------------------------------------------------------------------------- subprocesses


def emit(result: Dict[str, Any]) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_worker(args: argparse.Namespace) -> None:
    """Peak RSS of one method in this fresh process, above the RSS with model and input built."""
    torch.set_num_threads(args.threads)
    method: str = args.worker
    if method in SIZE_WORKERS:
        model = build_timm(args.model, dynamic=True)
        x = timm_input(model, args.size)
        name = {
            "size_forward": "forward",
            "size_lean": "legrad_all",
            "size_explicit": "legrad_all_explicit",
            "size_multi8": "multi8",
        }[method]
        fn = timm_method(name, model, x)
    elif method in CLIP_WORKERS:
        model, x, texts = build_clip(args.clip_model)
        fn = clip_method(method, model, x, texts)
    else:
        model = build_timm(args.model)
        x = timm_input(model)
        fn = timm_method(method, model, x)
    gc.collect()
    reset = reset_peak_rss()  # the peak now starts from the RSS with everything built
    base, peak_before, maxrss_before = current_rss_mib(), peak_rss_mib(), maxrss_mib()
    start = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - start
    emit(
        {
            "method": method,
            "size": args.size,
            "base_mib": base,
            "peak_mib": peak_rss_mib(),
            "peak_before_mib": peak_before,
            "reset": reset,
            "maxrss_before_mib": maxrss_before,
            "maxrss_mib": maxrss_mib(),
            "seconds": elapsed,
        }
    )


def run_clip_timing(args: argparse.Namespace) -> None:
    """Ours and legrad-torch alternated in this process, on the same random model."""
    torch.set_num_threads(args.threads)
    model, x, texts = build_clip(args.clip_model)
    names = ("clip_forward", "ours_clip1", "ref_clip1", "ours_clip8", "ref_clip8")
    fns = {name: clip_method(name, model, x, texts, own_copy=True) for name in names}
    times = round_robin(fns, args.repeats)
    emit(
        {
            "medians": medians(times),
            "flops": flop_counts(fns),
            "open_clip": version("open_clip_torch"),
            "legrad_torch": version("legrad-torch"),
            "torch": torch.__version__,
            "python": sys.executable,
        }
    )


def common_flags(args: argparse.Namespace) -> List[str]:
    return [
        str(Path(__file__).resolve()),
        "--threads",
        str(args.threads),
        "--model",
        args.model,
        "--clip-model",
        args.clip_model,
    ]


# --------------------------------------------------------------------------- sections


def log(message: str) -> None:
    print(f"[bench_cpu {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def fmt_load(value: Optional[float]) -> str:
    return "?" if value is None else f"{value:.2f}"


def goal_cell(value: float, goal: float) -> Tuple[str, str]:
    return f"≤ {goal:.2f}×", "yes" if value <= goal else "**no**"


def cost_section(args: argparse.Namespace, model: nn.Module, x: Tensor) -> List[str]:
    vit: Any = model
    depth = len(vit.blocks)
    half = max(1, depth // 2)
    names = ["forward", "legrad_all", "legrad_last2", "legrad_last1", f"legrad_last{half}"]
    names += ["legrad_all_explicit", "saliency", "multi1", "multi8", "singles8"]
    has_gradcam = gradcam_available() and not args.core
    if has_gradcam:
        names.insert(7, "gradcam")
    if args.core:  # a loaded machine: the ratios only
        names = ["forward", "legrad_all", "legrad_all_explicit", "legrad_last2"]
    fns = {name: timm_method(name, model, x, own_copy=True) for name in dict.fromkeys(names)}
    log(f"cost: {len(fns)} callables x {args.repeats} rounds")
    med = medians(round_robin(fns, args.repeats))
    if args.core:
        return core_cost_lines(args, x, med, depth, flop_counts(fns))
    k64_warmup = 0 if args.quick else 1  # the model and the code paths are warm by now
    log(f"K=64: multi64 vs a single call x {args.k64_repeats} rounds")
    med64 = medians(
        round_robin(
            {
                "single": timm_method("legrad_all", model, x),
                "multi64": timm_method("multi64", model, x),
            },
            args.k64_repeats,
            warmup=k64_warmup,
        )
    )

    rows: List[List[str]] = []

    def row(label: str, ours: float, other: float, goal: Optional[float] = None) -> None:
        value = ours / other
        goal_text, met = goal_cell(value, goal) if goal is not None else ("", "")
        rows.append([label, seconds(ours), seconds(other), ratio(value), goal_text, met])

    fwd = med["forward"]
    row(
        f"LeGrad, all {depth} layers ÷ plain no-grad forward",
        med["legrad_all"],
        fwd,
        GOALS["all_layers"],
    )
    row("LeGrad, last 2 layers ÷ plain no-grad forward", med["legrad_last2"], fwd)
    row(
        f'explicit route (`route="explicit"`), all {depth} layers ÷ forward',
        med["legrad_all_explicit"],
        fwd,
    )
    row("lean route ÷ explicit route, all layers", med["legrad_all"], med["legrad_all_explicit"])
    row("LeGrad (all layers) ÷ Captum `Saliency`", med["legrad_all"], med["saliency"])
    if has_gradcam:
        row("LeGrad (all layers) ÷ grad-cam `GradCAM`", med["legrad_all"], med["gradcam"])
        row("LeGrad, last 2 layers ÷ grad-cam `GradCAM`", med["legrad_last2"], med["gradcam"])
    row("K=1: `attribute_multi` ÷ one `attribute` call", med["multi1"], med["legrad_all"])
    row(
        "K=8: `attribute_multi` ÷ 8 `attribute` calls (timed)",
        med["multi8"],
        med["singles8"],
        GOALS["multi8"],
    )
    row(
        "K=64: `attribute_multi` ÷ 64 × the median single call",
        med64["multi64"],
        64 * med64["single"],
    )
    lines = [
        f"## Cost: `{args.model}`, random init, batch 1, {x.shape[-2]}×{x.shape[-1]}",
        "",
        markdown_table(["measure", "ours, s", "compared, s", "ratio", "goal", "met"], rows),
        "",
        "LeGrad rows use the default lean route unless marked explicit. "
        f"Medians of {args.repeats} alternating rounds. K=64: a single call and the 64-target "
        f"call alternate, {args.k64_repeats} round(s), "
        f"{'no warm-up (quick)' if k64_warmup == 0 else 'after a warm-up call each'}; the 64 "
        "single calls are counted as 64 × the median single call, not run. Target 3 (K "
        "targets: classes 0..K-1); single calls use `attribute`'s default output (the input's "
        "shape), `attribute_multi` its default `(B, K, H, W)`. "
        f"Plain forward: `model(x)` under `torch.no_grad()`, {seconds(fwd)} s. "
        "Saliency and GradCAM explain the same target on the same model (GradCAM on a copy, "
        "since it keeps hooks; its model's parameters require grad, as in its default use; "
        "`target_layers=[model.blocks[-1].norm1]`, prefix tokens dropped and the patch grid "
        "reshaped).",
    ]
    if not has_gradcam:
        lines.append("GradCAM rows skipped: `grad-cam` is not installed (`pip install grad-cam`).")
    layer_rows = []
    for n, key in ((1, "legrad_last1"), (2, "legrad_last2"), (half, f"legrad_last{half}")):
        layer_rows.append([f"last {n}", seconds(med[key]), ratio(med[key] / fwd)])
    layer_rows.append([f"all {depth}", seconds(med["legrad_all"]), ratio(med["legrad_all"] / fwd)])
    lines += [
        "",
        "## Scaling with the number of layers (same run)",
        "",
        markdown_table(["layers", "LeGrad, s", "÷ forward"], layer_rows),
    ]
    return lines


def core_cost_lines(
    args: argparse.Namespace,
    x: Tensor,
    med: Dict[str, float],
    depth: int,
    flops: Dict[str, float],
) -> List[str]:
    """The cost table of ``--core``: forward, both routes, last two layers."""
    fwd = med["forward"]
    rows: List[List[str]] = []
    for label, key, goal in (
        (f"LeGrad (lean), all {depth} layers ÷ plain no-grad forward", "legrad_all", True),
        (f"LeGrad (explicit route), all {depth} layers ÷ forward", "legrad_all_explicit", False),
        ("LeGrad (lean), last 2 layers ÷ forward", "legrad_last2", False),
    ):
        value = med[key] / fwd
        goal_text, met = goal_cell(value, GOALS["all_layers"]) if goal else ("", "")
        floor = ratio(flops[key] / flops["forward"])
        rows.append([label, seconds(med[key]), seconds(fwd), ratio(value), floor, goal_text, met])
    value = med["legrad_all"] / med["legrad_all_explicit"]
    rows.append(
        [
            "lean ÷ explicit route, all layers",
            seconds(med["legrad_all"]),
            seconds(med["legrad_all_explicit"]),
            ratio(value),
            ratio(flops["legrad_all"] / flops["legrad_all_explicit"]),
            "",
            "",
        ]
    )
    return [
        f"## Cost: `{args.model}`, random init, batch 1, {x.shape[-2]}×{x.shape[-1]} (`--core`)",
        "",
        markdown_table(
            ["measure", "ours, s", "compared, s", "ratio", "FLOP ratio", "goal", "met"], rows
        ),
        "",
        f"Medians of {args.repeats} alternating rounds after one warm-up call each; target 3. "
        f"FLOP ratio: the same quotient of counted FLOPs (`torch.utils.flop_counter`: matmuls, "
        f"convolution and attention; the forward is {flops['forward'] / 1e9:.1f} GFLOP), the "
        "floor the timed ratio reaches when the backward's matmuls run at the forward's rate. "
        "`--core` times only these four callables (Saliency, GradCAM and the K-target rows "
        "are in a run without `--core`).",
    ]


def resolution_section(args: argparse.Namespace) -> List[str]:
    model: Any = build_timm(args.model, dynamic=True)
    patch = int(model.patch_embed.patch_size[0])
    prefix = int(model.num_prefix_tokens)
    rows = []
    for size in args.sizes:
        x = timm_input(model, size)
        tokens = (size // patch) ** 2 + prefix
        repeats = args.resolution_repeats if size <= 448 else args.large_repeats
        fns = {
            "forward": timm_method("forward", model, x),
            "lean": timm_method("legrad_all", model, x),
        }
        if size <= args.explicit_max_size:
            fns["explicit"] = timm_method("legrad_all_explicit", model, x)
        log(f"resolution {size}: {', '.join(fns)} x {repeats} rounds")
        try:
            med = medians(round_robin(fns, repeats))
        except RuntimeError as err:  # out of memory at large sizes
            rows.append([f"{size}²", str(tokens), "-", "-", "-", "-", "-", str(err)[:80]])
            continue
        value = med["lean"] / med["forward"]
        goal, met = ("", "")
        if size == 672:
            goal, met = goal_cell(value, SIZE_GOALS["ratio_672"])
        explicit = med.get("explicit")
        rows.append(
            [
                f"{size}²",
                str(tokens),
                seconds(med["forward"]),
                seconds(med["lean"]),
                ratio(value),
                "-" if explicit is None else ratio(explicit / med["forward"]),
                goal,
                met,
            ]
        )
        del x, fns
        gc.collect()
    headers = ["size", "tokens", "forward, s", "LeGrad (lean), s", "lean ÷ forward"]
    headers += ["explicit ÷ forward", "goal", "met"]
    return [
        "## Scaling with the input size",
        "",
        f"`{args.model}` with `dynamic_img_size=True`, all layers, batch 1; medians of "
        f"{args.resolution_repeats} round(s) (sizes above 448: {args.large_repeats}) after one "
        "warm-up call each, forward and the routes alternating at each size; the explicit "
        f"route only up to {args.explicit_max_size}².",
        "",
        markdown_table(headers, rows),
    ]


def memory_scaling_section(args: argparse.Namespace) -> List[str]:
    """Peak RSS above the model against the input size, each (size, method) in a process."""
    jobs: List[Tuple[int, str]] = []
    for size in args.memory_sizes:
        jobs += [(size, "size_forward"), (size, "size_lean")]
        if size <= args.explicit_memory_max_size:
            jobs.append((size, "size_explicit"))
    if args.multi8_size:
        jobs.append((args.multi8_size, "size_multi8"))
    log(f"memory scaling: {len(jobs)} worker processes, {args.jobs} at a time")
    commands = [
        [sys.executable, *common_flags(args), "--worker", method, "--size", str(size)]
        for size, method in jobs
    ]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        outcomes = list(
            pool.map(lambda cmd: call_subprocess(cmd, timeout=args.subprocess_timeout), commands)
        )
    peaks: Dict[Tuple[int, str], float] = {}
    errors: Dict[Tuple[int, str], str] = {}
    seconds_of: Dict[Tuple[int, str], float] = {}
    for job, (result, error) in zip(jobs, outcomes):
        if result is None:
            errors[job] = error
            continue
        peaks[job] = result["peak_mib"] - result["base_mib"]
        seconds_of[job] = result["seconds"]

    def cell(job: Tuple[int, str]) -> str:
        if job in peaks:
            return f"{peaks[job]:.0f}"
        return f"failed: {errors[job]}" if job in errors else "not run"

    patch = 16
    rows = []
    for size in args.memory_sizes:
        tokens = (size // patch) ** 2 + 1
        rows.append(
            [
                f"{size}²",
                str(tokens),
                cell((size, "size_forward")),
                cell((size, "size_lean")),
                cell((size, "size_explicit")),
                seconds(seconds_of[(size, "size_lean")]) if (size, "size_lean") in peaks else "-",
            ]
        )
    lines = [
        "## Peak memory against the number of tokens",
        "",
        f"`{args.model}` (`dynamic_img_size=True`), all layers, 1 target, batch 1; each (size, "
        "method) once in a fresh process, peak RSS above the RSS with model, input and "
        "explainer built (as in the peak-memory table below).",
        "",
        markdown_table(
            [
                "size",
                "tokens",
                "forward, MiB",
                "LeGrad lean, MiB",
                "LeGrad explicit, MiB",
                "lean call, s",
            ],
            rows,
        ),
        "",
    ]
    goals = [(896, "size_lean", "mem_896", "896², 1 target")]
    if args.multi8_size == 1024:
        goals.append((1024, "size_multi8", "mem_1024_multi8", "1024², 8 targets (attribute_multi)"))
    for size, method, key, label in goals:
        if (size, method) in peaks:
            value, goal = peaks[(size, method)], SIZE_GOALS[key]
            met = "yes" if value <= goal else "**no**"
            lines.append(
                f"- goal, {label}: {value:.0f} MiB ≤ {goal:.0f} MiB: {met}"
                f" ({seconds_of[(size, method)]:.1f} s)"
            )
        else:
            lines.append(f"- goal, {label}: not measured ({cell((size, method))})")
    lines += ["", *text_plot(args.memory_sizes, peaks)]
    return lines


def text_plot(sizes: Sequence[int], peaks: Dict[Tuple[int, str], float]) -> List[str]:
    """Bars of peak MiB per size and method (log-free: one character per step)."""
    values = [v for v in peaks.values() if v > 0]
    if not values:
        return []
    step = max(values) / 60
    lines = ["```", f"peak RSS above the model, MiB (one # = {step:.0f} MiB)"]
    for size in sizes:
        for method, label in (
            ("size_forward", "forward "),
            ("size_lean", "lean    "),
            ("size_explicit", "explicit"),
        ):
            if (size, method) in peaks:
                value = peaks[(size, method)]
                bar = "#" * max(1, round(value / step)) if value > 0 else ""
                lines.append(f"{size:>5}² {label} {bar} {value:.0f}")
    lines.append("```")
    return lines


def reference_section(args: argparse.Namespace) -> List[str]:
    title = f"## Ours ÷ legrad-torch 1.1: OpenCLIP `{args.clip_model}`, `layers=[-2, -1]`"
    if not args.reference_python:
        return [
            title,
            "",
            "Skipped: pass `--reference-python /work/refvenv/bin/python` (the venv made by "
            "`scripts/reference_env.sh`).",
        ]
    log(f"reference: {args.reference_python}, {args.repeats} rounds")
    cmd = [args.reference_python, *common_flags(args), "--clip-timing"]
    cmd += ["--repeats", str(args.repeats)]
    result, error = call_subprocess(cmd, timeout=args.subprocess_timeout)
    if result is None:
        return [title, "", f"Failed: {error}"]
    med = result["medians"]
    flops: Dict[str, float] = result.get("flops", {})
    rows = []
    floors: List[str] = []
    for k, key in ((1, "ref1"), (8, "ref8")):
        if flops:
            ours_flops = flops[f"ours_clip{k}"] / flops["clip_forward"]
            ref_time = med[f"ref_clip{k}"] / med["clip_forward"]
            floors.append(
                f"{k} prompt{'s' if k > 1 else ''}: ours does {ratio(ours_flops)} a forward's "
                f"FLOPs (legrad-torch {ratio(flops[f'ref_clip{k}'] / flops['clip_forward'])}); "
                f"at the forward's FLOP rate ours takes at least {ratio(ours_flops)} a forward, "
                f"so ours ÷ legrad-torch ≥ {ratio(ours_flops / ref_time)} against its measured "
                f"{ratio(ref_time)}."
            )
        value = med[f"ours_clip{k}"] / med[f"ref_clip{k}"]
        rows.append(
            [
                f"{k} prompt{'s' if k > 1 else ''}",
                seconds(med[f"ours_clip{k}"]),
                seconds(med[f"ref_clip{k}"]),
                ratio(value),
                *goal_cell(value, GOALS[key]),
                ratio(med[f"ours_clip{k}"] / med["clip_forward"]),
                ratio(med[f"ref_clip{k}"] / med["clip_forward"]),
            ]
        )
    headers = ["prompts", "ours, s", "legrad-torch, s", "ratio", "goal", "met"]
    headers += ["ours ÷ forward", "legrad-torch ÷ forward"]
    return [
        title,
        "",
        markdown_table(headers, rows),
        "",
        f"One process (`{args.reference_python}`: torch {result['torch']}, open_clip "
        f"{result['open_clip']}, legrad-torch {result['legrad_torch']}), random init, one "
        f"224² image, random unit text embeddings; the five callables alternate, medians of "
        f"{args.repeats} round(s). Ours: `LeGrad(ImageTextSimilarity(model, T), layers=[-2, -1])`"
        ", `attribute` for 1 prompt, `attribute_multi` for 8. legrad-torch: `LeWrapper(deepcopy"
        "(model), layer_index=-2).compute_legrad(text_embedding=T, image=x)`. No-grad "
        f"`encode_image`: {seconds(med['clip_forward'])} s.",
        *(["", f"FLOP floor ({FLOP_NOTE}):", ""] if floors else []),
        *[f"- {line}" for line in floors],
    ]


def memory_section(args: argparse.Namespace) -> List[str]:
    methods: List[Tuple[str, str]] = [(sys.executable, m) for m in TIMM_WORKERS]
    if not gradcam_available():
        methods = [(py, m) for py, m in methods if m != "gradcam"]
    if args.quick:
        methods = [(py, m) for py, m in methods if m != "multi64"]
    if args.reference_python:
        methods += [(args.reference_python, m) for m in CLIP_WORKERS]
    rows = []
    peaks: Dict[str, float] = {}
    log(f"memory: {len(methods)} worker processes, {args.jobs} at a time")
    commands = [[python, *common_flags(args), "--worker", method] for python, method in methods]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        outcomes = list(
            pool.map(lambda cmd: call_subprocess(cmd, timeout=args.subprocess_timeout), commands)
        )
    for (python, method), (result, error) in zip(methods, outcomes):
        model = args.clip_model if method in CLIP_WORKERS else args.model
        where = "reference venv" if python != sys.executable else "main venv"
        if result is None:
            rows.append([method, model, where, "-", f"failed: {error}"])
            continue
        extra = result["peak_mib"] - result["base_mib"]
        unchanged = result["peak_mib"] <= result["peak_before_mib"]
        bound = "≤ " if unchanged and not result.get("reset") else ""
        peaks[method] = extra
        rows.append([method, model, where, f"{result['base_mib']:.0f}", f"{bound}{extra:.0f}"])
    lines = [
        "## Peak memory (RSS), each method in a fresh process",
        "",
        markdown_table(
            ["method", "model", "interpreter", "RSS with model + input, MiB", "peak above, MiB"],
            rows,
        ),
        "",
        "Each method runs once in its own process (`--worker METHOD`, batch 1): the peak RSS "
        "of that process after the call minus its RSS after building the model, the input and "
        "the explainer. The peak is the kernel's `VmHWM`, reset to the current RSS just before "
        "the call (`/proc/self/clear_refs`), so model building does not mask it; it is what "
        "`getrusage(RUSAGE_SELF).ru_maxrss` reports for a process whose peak is reached in the "
        "call (`ru_maxrss` alone would also count the RSS of the parent at `exec`, which Linux "
        "carries over). '≤' marks a peak that could not be reset and was not exceeded by the "
        "call: an upper bound.",
    ]
    for k in (1, 8):
        ours, ref = peaks.get(f"ours_clip{k}"), peaks.get(f"ref_clip{k}")
        if ours is not None and ref is not None:
            met = "yes" if ours <= ref else "**no**"
            lines.append(
                f"- goal, {k} prompt{'s' if k > 1 else ''}: ours {ours:.0f} MiB ≤ legrad-torch "
                f"{ref:.0f} MiB: {met}"
            )
    if not args.reference_python:
        lines.append("- reference rows skipped: no `--reference-python`.")
    return lines


# --------------------------------------------------------------------------- profile


@contextlib.contextmanager
def labelled_phases() -> Iterator[None]:
    """Wrap the phases of ``LeGrad.attribute`` in ``record_function`` labels (this process)."""
    from captum_legrad import attribution

    names = ("run_forward", "layer_maps", "aggregate_layers", "upsample", "minmax_normalize")
    originals = {name: getattr(attribution, name) for name in names}

    def wrap(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def inner(*a: Any, **k: Any) -> Any:
            with torch.profiler.record_function(label):
                return fn(*a, **k)

        return inner

    try:
        for name, fn in originals.items():
            setattr(attribution, name, wrap(f"legrad:{name}", fn))
        yield
    finally:
        for name, fn in originals.items():
            setattr(attribution, name, fn)


def run_profile(args: argparse.Namespace) -> None:
    from torch.profiler import ProfilerActivity, profile, record_function

    from captum_legrad import LeGrad, discover

    torch.set_num_threads(args.threads)
    model = build_timm(args.model)
    x = timm_input(model)
    spec = discover(model)

    def readout(tokens: Tensor) -> Tensor:
        with record_function("legrad:readout"):
            return spec.readout(tokens)

    legrad = LeGrad(model, spec=dataclasses.replace(spec, readout=readout), route=args.route)
    calls = args.profile_calls
    with labelled_phases():
        legrad.attribute(x, target=3)  # warm-up
        with torch.no_grad():
            model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                with record_function("legrad:attribute"):
                    legrad.attribute(x, target=3)
            for _ in range(calls):
                with record_function("plain no-grad forward"), torch.no_grad():
                    model(x)
    events = prof.key_averages()
    total = {e.key: e.cpu_time_total / 1e3 / calls for e in events if e.key.startswith("legrad:")}
    total["plain no-grad forward"] = next(
        e.cpu_time_total / 1e3 / calls for e in events if e.key == "plain no-grad forward"
    )
    print(
        f"# Profile of LeGrad.attribute (all layers, route {args.route!r}), `{args.model}`, "
        "224², batch 1"
    )
    print(f"\n{machine_line()}; torch {torch.__version__}; {args.threads} threads; ")
    print(f"load average {fmt_load(load_average())}; mean of {calls} calls\n")
    rows = [[key, f"{value:.1f}"] for key, value in sorted(total.items(), key=lambda kv: -kv[1])]
    print(markdown_table(["phase (inclusive)", "ms per call"], rows))
    print(
        "\n`legrad:run_forward` = the forward with capture (lean: the model's own attention, "
        "outputs and values kept; explicit: the probabilities computed in every selected "
        "block) plus `legrad:readout` (all layers through norm + head in one batch); "
        "`legrad:layer_maps` = the one `autograd.grad` plus the ReLU/mean reductions.\n"
    )
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))


# --------------------------------------------------------------------------- main


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: few repeats, no 896²")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (2)")
    parser.add_argument("--model", default="vit_base_patch16_224", help="timm model name")
    parser.add_argument("--clip-model", default="ViT-B-16", help="OpenCLIP model name")
    parser.add_argument("--repeats", type=int, help="rounds per table (9; quick 3)")
    parser.add_argument("--k64-repeats", type=int, help="rounds of the K=64 pair (3; quick 1)")
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        help="input sizes timed (224 448 672 896 1024; quick: 224 448)",
    )
    parser.add_argument(
        "--explicit-max-size",
        type=int,
        default=672,
        help="time the explicit route up to this size (672)",
    )
    parser.add_argument(
        "--memory-sizes",
        type=int,
        nargs="+",
        help="input sizes of the memory-scaling table (224 448 672 896 1024; quick: 224 448)",
    )
    parser.add_argument(
        "--explicit-memory-max-size",
        type=int,
        default=896,
        help="measure the explicit route's memory up to this size (896: ~13 GiB)",
    )
    parser.add_argument(
        "--multi8-size",
        type=int,
        help="size of the 8-target memory worker (1024; quick: none; 0 skips it)",
    )
    parser.add_argument("--skip-memory-scaling", action="store_true")
    parser.add_argument(
        "--core",
        action="store_true",
        help="cost table with forward, both routes and the last 2 layers only (loaded machine)",
    )
    parser.add_argument("--skip-cost", action="store_true", help="no cost table")
    parser.add_argument("--size", type=int, default=224, help=argparse.SUPPRESS)
    parser.add_argument(
        "--resolution-repeats", type=int, help="rounds per size <= 448 (5; quick 2)"
    )
    parser.add_argument("--large-repeats", type=int, help="rounds per size > 448 (3; quick 1)")
    parser.add_argument(
        "--reference-python",
        help="interpreter of the reference venv (scripts/reference_env.sh), e.g. "
        "/work/refvenv/bin/python; without it the legrad-torch rows are skipped",
    )
    parser.add_argument("--skip-memory", action="store_true", help="no peak-memory subprocesses")
    parser.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="memory worker processes at a time (2); RSS is per process, so running them side "
        "by side changes only how long they take",
    )
    parser.add_argument("--skip-scaling", action="store_true", help="no input-size table")
    parser.add_argument("--out", type=Path, help="also write the Markdown here")
    parser.add_argument("--subprocess-timeout", type=float, default=900.0)
    parser.add_argument("--profile", action="store_true", help="profile one LeGrad call instead")
    parser.add_argument("--profile-calls", type=int, default=3)
    parser.add_argument(
        "--route", choices=("lean", "explicit"), default="lean", help="route profiled (lean)"
    )
    parser.add_argument("--profile-rows", type=int, default=20)
    parser.add_argument(
        "--worker", choices=TIMM_WORKERS + CLIP_WORKERS + SIZE_WORKERS, help=argparse.SUPPRESS
    )
    parser.add_argument("--clip-timing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    defaults = {
        "repeats": (9, 3),
        "k64_repeats": (3, 1),
        "sizes": ([224, 448, 672, 896, 1024], [224, 448]),
        "memory_sizes": ([224, 448, 672, 896, 1024], [224, 448]),
        "multi8_size": (1024, 0),
        "resolution_repeats": (5, 2),
        "large_repeats": (3, 1),
    }
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return
    if args.clip_timing:
        run_clip_timing(args)
        return
    if args.profile:
        run_profile(args)
        return
    torch.set_num_threads(args.threads)
    started, load_start = time.perf_counter(), load_average()
    lines: List[str] = []
    if not args.skip_cost:
        model = build_timm(args.model)
        x = timm_input(model)
        lines += cost_section(args, model, x)
        del model, x
        gc.collect()
    lines += ["", *reference_section(args)]
    if not args.skip_scaling:
        lines += ["", *resolution_section(args)]
    if not args.skip_memory_scaling:
        lines += ["", *memory_scaling_section(args)]
    if not args.skip_memory:
        lines += ["", *memory_section(args)]
    minutes = (time.perf_counter() - started) / 60
    load_end = load_average()
    header = [
        "# captum_legrad CPU benchmark",
        "",
        f"- machine: {machine_line()}",
        f"- torch {torch.__version__}, `torch.set_num_threads({args.threads})`; timm "
        f"{version('timm')}, captum {version('captum')}, open_clip {version('open_clip_torch')}, "
        f"grad-cam {version('grad-cam')}",
        f"- {'quick' if args.quick else 'full'} run, {today()}, {minutes:.1f} min; load average "
        f"(1 min) {fmt_load(load_start)} at start, {fmt_load(load_end)} at end "
        f"({os.cpu_count()} CPUs: above that the timings are contended)",
        "- goals (issue #11): LeGrad all layers ≤ 1.5× forward at 224², ≤ 1.8× at 672²; "
        "peak memory above the model ≤ 1.5 GiB at 896² (1 target), ≤ 4 GiB at 1024² (8 "
        "targets); ours ÷ legrad-torch ≤ 0.9× (1 prompt), ≤ 0.2× (8 prompts); 8 targets ≤ "
        "0.55× eight single calls; peak memory no higher than legrad-torch's",
        "- the machine is shared with other jobs: compare ratios (measured in one process, "
        "alternating), not seconds; see the load average",
        "",
    ]
    text = "\n".join(header + lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
