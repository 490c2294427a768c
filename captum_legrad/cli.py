"""The ``captum-legrad`` command line: ``demo``, ``explain`` and ``eval``.

    captum-legrad demo --out out/demo
    captum-legrad explain photo.jpg --model timm:vit_base_patch16_224 --weights vit.safetensors \\
        --target 281 --out out/explain
    captum-legrad explain images/ --model open_clip:ViT-B-16 --weights clip.bin \\
        --prompt "a cat" "a remote" --out out/explain
    captum-legrad eval --dataset shapes --out out/eval
    torchrun --nproc_per_node 4 -m captum_legrad.cli eval --dataset imagenet-seg \\
        --data gtsegs_ijcv.mat --model timm:vit_base_patch16_224 --weights vit.pth --out out/seg

Errors in what was asked (a missing file, an unknown model, a target out of range) end the
program with exit code 2 and a one-line message. No network access is ever needed: models
are built without pretrained weights and loaded from ``--weights``.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from .attribution import LeGrad
from .eval import distributed
from .eval.datasets import ImageNetSegmentation, OpenImagesPoints, load_image, resize_image
from .eval.distributed import Context
from .eval.harness import (
    COLUMNS,
    METHOD_NAMES,
    METHODS,
    EvalBatch,
    EvalConfig,
    build_methods,
    evaluate_batches,
    mean_curves,
    summarize,
)
from .eval.models import LoadedModel, ModelError, load_model
from .eval.progress import progress_bar

__all__ = ["main", "build_parser", "CLIError"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
PROMPT_TEMPLATE = "a photo of a {}."


class CLIError(Exception):
    """A problem with what the user asked for: reported in one line, exit code 2."""


# --------------------------------------------------------------------------- helpers


def _load(spec: str, weights: Optional[Path], num_classes: Optional[int] = None) -> Any:
    try:
        return load_model(spec, weights, num_classes)
    except ModelError as error:
        raise CLIError(str(error)) from error


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:60] or "target"


def _image_files(path: Path) -> List[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise CLIError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {path}")
        return files
    raise CLIError(f"no such image or folder: {path}")


def _format(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.1f}"


def markdown_table(results: Dict[str, Dict[str, float]]) -> str:
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
        label = METHODS[name][0] if name in METHODS else name
        cells = [_format(row.get(key, float("nan"))) for key, _ in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write_csv(path: Path, results: Dict[str, Dict[str, float]]) -> None:
    keys = sorted({key for row in results.values() for key in row})
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", *keys])
        for name, row in results.items():
            writer.writerow([name, *(f"{row.get(key, float('nan')):.6g}" for key in keys)])


# --------------------------------------------------------------------------- datasets


BatchFactory = Callable[[], EvalBatch]


def _shapes_batches(
    loaded: LoadedModel, num_images: int, batch_size: int, seed: int, device: torch.device
) -> Tuple[List[BatchFactory], List[str]]:
    from .data import ShapesDataset

    data = ShapesDataset(num_images, seed=seed, image_size=loaded.image_size[0])

    def make(start: int) -> BatchFactory:
        def build() -> EvalBatch:
            batch = data.batch(range(start, min(start + batch_size, num_images)))
            inputs = loaded.normalize(batch.images).to(device)
            with torch.no_grad():
                logits = loaded.model(inputs)
            exact = ((logits > 0) == (batch.targets.to(device) > 0.5)).all(dim=1).double()
            images, targets, masks, correct, first = [], [], [], [], []
            for i, sample in enumerate(batch.samples):
                for k, (label, mask) in enumerate(zip(sample.labels, sample.masks)):
                    images.append(inputs[i])
                    targets.append(int(label))
                    masks.append(mask)
                    correct.append(exact[i])
                    first.append(k == 0)
            return EvalBatch(
                images=torch.stack(images),
                targets=torch.tensor(targets, device=device),
                masks=torch.stack(masks).to(device),
                correct=torch.stack(correct),
                first=torch.tensor(first, device=device),
            )

        return build

    return [make(s) for s in range(0, num_images, batch_size)], list(data.classes)


def _imagenet_seg_batches(
    loaded: LoadedModel,
    path: Path,
    num_images: Optional[int],
    batch_size: int,
    device: torch.device,
) -> List[BatchFactory]:
    try:
        data = ImageNetSegmentation(path, image_size=loaded.image_size)
    except (FileNotFoundError, ValueError, OSError) as error:
        raise CLIError(str(error).splitlines()[0]) from error
    total = len(data) if num_images is None else min(num_images, len(data))

    def make(start: int) -> BatchFactory:
        def build() -> EvalBatch:
            pairs = [data[i] for i in range(start, min(start + batch_size, total))]
            inputs = loaded.normalize(torch.stack([p[0] for p in pairs])).to(device)
            with torch.no_grad():
                predicted = loaded.model(inputs).argmax(dim=1)
            return EvalBatch(
                images=inputs,
                targets=predicted,
                masks=torch.stack([p[1] for p in pairs]).to(device),
            )

        return build

    return [make(s) for s in range(0, total, batch_size)]


def _openimages_batches(
    loaded: LoadedModel,
    path: Path,
    images: Optional[Path],
    descriptions: Optional[Path],
    num_images: Optional[int],
    batch_size: int,
    device: torch.device,
) -> Tuple[List[BatchFactory], nn.Module, int]:
    if loaded.with_prompts is None:
        raise CLIError("--dataset openimages needs an image-text model (open_clip:NAME, hf:PATH).")
    if images is None:
        raise CLIError("--dataset openimages needs --images DIR with the <ImageId>.jpg files.")
    try:
        data = OpenImagesPoints(path, images, descriptions, image_size=loaded.image_size)
    except (FileNotFoundError, ValueError) as error:
        raise CLIError(str(error)) from error
    if len(data) == 0:
        raise CLIError(f"none of the images listed in {path} is in {images}")
    model = loaded.with_prompts([PROMPT_TEMPLATE.format(name) for name in data.names])
    model = model.to(device).eval()
    total = len(data) if num_images is None else min(num_images, len(data))
    height, width = loaded.image_size

    def make(start: int) -> BatchFactory:
        def build() -> EvalBatch:
            inputs, targets, points, labels, first = [], [], [], [], []
            for i in range(start, min(start + batch_size, total)):
                image, entries = data[i]
                normalised = loaded.normalize(image).to(device)
                for k, entry in enumerate(entries):
                    inputs.append(normalised)
                    targets.append(data.class_index[entry.label])
                    scale = torch.tensor([width, height], dtype=torch.float32)
                    points.append((entry.points * scale).to(device))
                    labels.append(entry.positive.to(device))
                    first.append(k == 0)
            return EvalBatch(
                images=torch.stack(inputs),
                targets=torch.tensor(targets, device=device),
                points=points,
                point_labels=labels,
                first=torch.tensor(first, device=device),
            )

        return build

    return [make(s) for s in range(0, total, batch_size)], model, len(data.classes)


# --------------------------------------------------------------------------- commands


def run_evaluation(
    loaded: LoadedModel,
    model: nn.Module,
    factories: Sequence[BatchFactory],
    method_names: Sequence[str],
    config: EvalConfig,
    context: Context,
    *,
    show_progress: bool = True,
    examples: int = 0,
) -> Tuple[
    Dict[str, Dict[str, float]],
    Dict[str, Any],
    Dict[str, Tensor],
    Dict[str, Tuple[Tensor, Tensor]],
]:
    """Evaluate this process's shard and reduce over processes.

    Returns ``(per-method summaries, model summary, example maps, perturbation curves)``;
    the example maps come from this process's first batch (``examples`` pairs).
    """
    methods = build_methods(model, method_names)
    mine = distributed.shard(list(factories), context)
    bar = progress_bar(
        len(mine), f"eval [rank {context.rank}/{context.world}] batches", disable=not show_progress
    )
    outcome = evaluate_batches(
        model,
        methods,
        (factory() for factory in mine),
        config,
        progress=bar.update,
        examples=examples,
    )
    bar.close()
    outcome.all_reduce(context.device if context.device.type == "cuda" else None)
    sums, model_sums = outcome.sums, outcome.model_sums
    example_maps = outcome.example_maps or {}
    example_batch = outcome.example_batch
    results = {name: summarize(value, config) for name, value in sums.items()}
    curves = {}
    for name, value in sums.items():
        pair = mean_curves(value)
        if pair is not None:
            curves[name] = pair
    labelled = float(model_sums["labelled"])
    model_summary = {
        "images": int(model_sums["images"]),
        "accuracy": float(100 * model_sums["correct"] / labelled) if labelled else float("nan"),
        "example_batch": example_batch,
    }
    return results, model_summary, example_maps, curves


def _report(
    out: Path, title: str, description: List[str], results: Dict[str, Dict[str, float]]
) -> str:
    table = markdown_table(results)
    text = "\n".join([f"# {title}", "", *description, "", table, ""])
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text, encoding="utf-8")
    _write_csv(out / "results.csv", results)
    return table


def _example_figure(
    path: Path, loaded: LoadedModel, summary: Dict[str, Any], maps: Dict[str, Tensor], classes: Any
) -> None:
    batch = summary.get("example_batch")
    if batch is None or not maps:
        return
    n = next(iter(maps.values())).shape[0]
    mean = torch.tensor(loaded.mean).view(1, -1, 1, 1)
    std = torch.tensor(loaded.std).view(1, -1, 1, 1)
    images = (batch.images[:n].cpu() * std + mean).clamp(0, 1)
    titles = [
        str(classes[int(t)]) if classes is not None else str(int(t)) for t in batch.targets[:n]
    ]
    masks = batch.masks[:n].cpu() if batch.masks is not None else None
    from .eval.plots import save_grid

    columns = {METHODS[name][0]: value for name, value in maps.items()}
    save_grid(path, images, columns, titles=titles, masks=masks)


def _eval_config(
    loaded: LoadedModel, args: argparse.Namespace, perturbation: bool, points: int
) -> Any:
    threshold: Any = args.threshold
    if threshold != "mean":
        try:
            threshold = float(threshold)
        except ValueError as error:
            raise CLIError(f"--threshold must be a number or 'mean', got {threshold!r}") from error
    return EvalConfig(
        patch_size=loaded.patch_size,
        multilabel=loaded.multilabel,
        perturbation=perturbation,
        threshold=threshold,
        num_point_classes=points,
        pointing_tolerance=getattr(args, "pointing_tolerance", None),
    )


def _save_curves(out: Path, curves: Dict[str, Tuple[Tensor, Tensor]]) -> None:
    from .eval.metrics import DEFAULT_FRACTIONS
    from .eval.plots import save_curves

    if curves:
        named = {METHODS[name][0]: value for name, value in curves.items()}
        save_curves(out / "curves.png", DEFAULT_FRACTIONS, named)


def cmd_eval(args: argparse.Namespace) -> int:
    methods = list(args.methods or METHOD_NAMES)
    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown:
        raise CLIError(
            f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHOD_NAMES)}"
        )
    context = distributed.init(args.device)
    try:
        torch.manual_seed(0)
        loaded = _load(args.model, args.weights, args.num_classes)
        loaded.model.to(context.device)
        model: nn.Module = loaded.model
        classes: Any = loaded.classes
        perturbation = not args.no_perturbation
        points = 0
        if args.dataset == "shapes":
            if not loaded.multilabel or loaded.classes is None:
                raise CLIError("--dataset shapes needs a shapes model (--model default).")
            factories, classes = _shapes_batches(
                loaded, args.num_images or 1000, args.batch_size, args.seed, context.device
            )
            description = f"shapes test split (seed {args.seed})"
        elif args.dataset == "imagenet-seg":
            if args.data is None:
                raise CLIError("--dataset imagenet-seg needs --data gtsegs_ijcv.mat")
            factories = _imagenet_seg_batches(
                loaded, args.data, args.num_images, args.batch_size, context.device
            )
            description = (
                f"ImageNet-segmentation ({args.data.name}), explaining the predicted class"
            )
        else:
            if args.data is None:
                raise CLIError("--dataset openimages needs --data POINT_LABELS.csv")
            factories, model, points = _openimages_batches(
                loaded,
                args.data,
                args.images,
                args.class_descriptions,
                args.num_images,
                args.batch_size,
                context.device,
            )
            perturbation = False
            classes = None
            description = (
                f"OpenImagesV7 point labels ({args.data.name}), prompt '{PROMPT_TEMPLATE}'"
            )
        config = _eval_config(loaded, args, perturbation, points)
        start = time.perf_counter()
        results, summary, maps, curves = run_evaluation(
            loaded,
            model,
            factories,
            methods,
            config,
            context,
            show_progress=not args.quiet,
            examples=6 if context.is_main and not args.no_plots else 0,
        )
        seconds = time.perf_counter() - start
        if context.is_main:
            lines = [
                f"Dataset: {description}; {summary['images']} images, "
                f"{int(next(iter(results.values()))['pairs'])} (image, target) pairs.",
                f"Model: `{args.model}`"
                + (
                    f"; classification accuracy (all labels right): {summary['accuracy']:.1f} %."
                    if not math.isnan(summary["accuracy"])
                    else "."
                ),
                f"Pointing game within {config.tolerance_for(*loaded.image_size)} px; maps "
                f"binarised at {config.threshold} for mIoU / pixel accuracy; perturbation AUCs "
                "are areas × 100 over 0–90 % of patches removed (model accuracy on the target).",
            ]
            table = _report(args.out, "captum-legrad eval", lines, results)
            if not args.no_plots:
                _save_curves(args.out, curves)
                _example_figure(args.out / "examples.png", loaded, summary, maps, classes)
            print("\n".join(lines))
            print()
            print(table)
            print(f"\nwrote {args.out}/results.md, results.csv ({seconds:.1f} s)")
    finally:
        distributed.finish()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    torch.manual_seed(0)
    loaded = _load("default", None)
    args.threshold = "0.5"
    config = _eval_config(loaded, args, True, 0)
    factories, classes = _shapes_batches(
        loaded, args.num_images, 50, args.seed, torch.device("cpu")
    )
    context = Context(rank=0, world=1, device=torch.device("cpu"))
    results, summary, maps, curves = run_evaluation(
        loaded,
        loaded.model,
        factories,
        list(METHOD_NAMES),
        config,
        context,
        show_progress=not args.quiet,
        examples=args.examples,
    )
    lines = [
        f"Bundled shapes ViT on {summary['images']} held-out images "
        f"(classification accuracy {summary['accuracy']:.1f} %).",
    ]
    table = _report(args.out, "captum-legrad demo", lines, results)
    _save_curves(args.out, curves)
    shown = {k: v for k, v in maps.items() if k in ("legrad", "gae", "gradcam")}
    _example_figure(args.out / "demo.png", loaded, summary, shown, classes)
    print(lines[0])
    print()
    print(table)
    print(f"\nwrote {args.out}/demo.png, results.md ({time.perf_counter() - start:.1f} s)")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from .eval.plots import save_overlay

    files = _image_files(args.input)
    loaded = _load(args.model, args.weights, args.num_classes)
    if args.prompt:
        if loaded.with_prompts is None:
            raise CLIError(
                f"{args.model} has no text tower: use --target CLASS instead of --prompt"
            )
        model = loaded.with_prompts(args.prompt).eval()
        targets = list(range(len(args.prompt)))
        names = [_safe(p) for p in args.prompt]
    else:
        if loaded.with_prompts is not None:
            raise CLIError(f"{args.model} is an image-text model: give --prompt TEXT ...")
        model = loaded.model
        targets = list(args.target)
        names = [
            _safe(loaded.classes[t])
            if loaded.classes and 0 <= t < len(loaded.classes)
            else f"class{t}"
            for t in targets
        ]
    try:
        legrad = LeGrad(model, layers=args.layers)
    except (TypeError, ValueError) as error:
        raise CLIError(str(error)) from error
    args.out.mkdir(parents=True, exist_ok=True)
    checked = False
    bar = progress_bar(len(files), "explain", disable=args.quiet or len(files) == 1)
    for path in files:
        try:
            image = resize_image(load_image(path), loaded.image_size)
        except (OSError, ValueError) as error:
            raise CLIError(f"cannot read image {path}: {error}") from error
        x = loaded.normalize(image)[None]
        if not checked:
            with torch.no_grad():
                out = model(x)
            classes = out.shape[-1]
            bad = [t for t in targets if not 0 <= t < classes]
            if bad:
                raise CLIError(
                    f"target {bad[0]} is out of range: the model has {classes} outputs "
                    f"(0..{classes - 1})"
                )
            checked = True
        maps = legrad.attribute_multi(x, targets=targets, output="map")[0]
        for k, name in enumerate(names):
            stem = f"{path.stem}_{name}"
            np.save(args.out / f"{stem}.npy", maps[k].numpy().astype(np.float32))
            save_overlay(args.out / f"{stem}.png", image, maps[k])
        bar.update(1)
    bar.close()
    print(f"wrote {len(files) * len(names)} overlays (.png) and maps (.npy) to {args.out}")
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``captum-legrad``."""
    parser = argparse.ArgumentParser(
        prog="captum-legrad",
        description="LeGrad explanations for Vision Transformers (Captum): demo, explain, eval.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="offline demo on the bundled shapes model")
    demo.add_argument("--out", type=Path, default=Path("out/demo"))
    demo.add_argument("--num-images", type=int, default=24, help="images in the metric table")
    demo.add_argument("--examples", type=int, default=6, help="rows in demo.png")
    demo.add_argument("--seed", type=int, default=1, help="dataset seed (1 = the test split)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=cmd_demo)

    explain = sub.add_parser("explain", help="LeGrad overlays and .npy maps for images")
    explain.add_argument("input", type=Path, help="an image file or a folder of images")
    explain.add_argument(
        "--model", required=True, help="default | timm:NAME | open_clip:NAME | hf:PATH"
    )
    explain.add_argument("--weights", type=Path, help=".safetensors or torch.save state dict")
    explain.add_argument("--num-classes", type=int, help="timm: size of the classifier head")
    what = explain.add_mutually_exclusive_group(required=True)
    what.add_argument("--target", type=int, nargs="+", help="class index(es) to explain")
    what.add_argument("--prompt", nargs="+", help="text prompt(s) (image-text models)")
    explain.add_argument("--layers", type=int, nargs="+", help="block indices (default: all)")
    explain.add_argument("--out", type=Path, required=True)
    explain.add_argument("--quiet", action="store_true", help="no progress bar")
    explain.set_defaults(func=cmd_explain)

    ev = sub.add_parser("eval", help="localisation and perturbation metrics, LeGrad vs baselines")
    ev.add_argument("--dataset", choices=("shapes", "imagenet-seg", "openimages"), required=True)
    ev.add_argument("--data", type=Path, help="gtsegs_ijcv.mat or the point-label CSV")
    ev.add_argument("--images", type=Path, help="openimages: folder of <ImageId>.jpg")
    ev.add_argument("--class-descriptions", type=Path, help="openimages: LabelName,DisplayName CSV")
    ev.add_argument(
        "--model", default="default", help="default | timm:NAME | open_clip:NAME | hf:PATH"
    )
    ev.add_argument("--weights", type=Path)
    ev.add_argument("--num-classes", type=int)
    ev.add_argument(
        "--methods", nargs="+", metavar="METHOD", help=f"subset of {', '.join(METHOD_NAMES)}"
    )
    ev.add_argument("--num-images", type=int, help="shapes: default 1000; others: all")
    ev.add_argument("--batch-size", type=int, default=50, help="images per batch")
    ev.add_argument("--seed", type=int, default=1, help="shapes: dataset seed (1 = test split)")
    ev.add_argument("--threshold", default="0.5", help="binarisation threshold, or 'mean'")
    ev.add_argument(
        "--pointing-tolerance",
        type=int,
        help="pointing-game tolerance in pixels (default: 15 at 224, scaled to the input)",
    )
    ev.add_argument("--no-perturbation", action="store_true", help="skip perturbation tests")
    ev.add_argument("--no-plots", action="store_true", help="no curves.png / examples.png")
    ev.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ev.add_argument("--out", type=Path, required=True)
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(func=cmd_eval)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``captum-legrad``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except CLIError as error:
        print(f"captum-legrad: error: {error}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
