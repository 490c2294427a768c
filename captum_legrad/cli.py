"""The ``captum-legrad`` command line: ``demo``, ``explain``, ``eval`` and ``app``.

    captum-legrad demo --out out/demo
    captum-legrad explain photo.jpg --model timm:vit_base_patch16_224 --weights vit.safetensors \\
        --target 281 --out out/explain
    captum-legrad explain images/ --model open_clip:ViT-B-16 --weights clip.bin \\
        --prompt "a cat" "a remote" --out out/explain
    captum-legrad eval --dataset shapes --out out/eval
    torchrun --nproc_per_node 4 -m captum_legrad.cli eval --dataset imagenet-seg \\
        --data gtsegs_ijcv.mat --model timm:vit_base_patch16_224 --weights vit.pth --out out/seg

This module only parses arguments and calls functions: models come from
:mod:`captum_legrad.eval.models` (one loader per family of the registry), data from
:mod:`captum_legrad.eval.batches`, the run from :mod:`captum_legrad.eval.runner` and the
files from :mod:`captum_legrad.eval.report` and :mod:`captum_legrad.viz`. Errors in what was
asked (a missing file, an unknown model, a target out of range) end the program with exit
code 2 and a one-line message. No network access is ever needed: models are built without
pretrained weights and loaded from ``--weights``.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from pathlib import Path
from typing import Any, List, Optional, Sequence

__all__ = ["main", "build_parser", "CLIError"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


class CLIError(Exception):
    """A problem with what the user asked for: reported in one line, exit code 2."""


def _load(spec: str, weights: Optional[Path], num_classes: Optional[int] = None) -> Any:
    from .eval.models import ModelError, load_model

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


def _eval_config(
    loaded: Any, threshold_text: str, perturbation: bool, points: int, tolerance: Optional[int]
) -> Any:
    from .eval.harness import EvalConfig

    threshold: Any = threshold_text
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
        pointing_tolerance=tolerance,
    )


# --------------------------------------------------------------------------- commands


def cmd_eval(args: argparse.Namespace) -> int:
    """``captum-legrad eval``: metric table of LeGrad and the baselines on a data set."""
    import torch

    from .eval import distributed
    from .eval.batches import (
        PROMPT_TEMPLATE,
        DataError,
        imagenet_seg_batches,
        openimages_batches,
        shapes_batches,
    )
    from .eval.harness import METHOD_NAMES
    from .eval.report import save_curves, save_examples, write_report
    from .eval.runner import run_evaluation

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
        model = loaded.model
        classes: Any = loaded.classes
        perturbation = not args.no_perturbation
        points = 0
        try:
            if args.dataset == "shapes":
                factories, classes = shapes_batches(
                    loaded, args.num_images or 1000, args.batch_size, args.seed, context.device
                )
                description = f"shapes test split (seed {args.seed})"
            elif args.dataset == "imagenet-seg":
                if args.data is None:
                    raise CLIError("--dataset imagenet-seg needs --data gtsegs_ijcv.mat")
                factories = imagenet_seg_batches(
                    loaded, args.data, args.num_images, args.batch_size, context.device
                )
                description = (
                    f"ImageNet-segmentation ({args.data.name}), explaining the predicted class"
                )
            else:
                if args.data is None:
                    raise CLIError("--dataset openimages needs --data POINT_LABELS.csv")
                factories, model, points = openimages_batches(
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
        except DataError as error:
            raise CLIError(str(error)) from error
        config = _eval_config(loaded, args.threshold, perturbation, points, args.pointing_tolerance)
        start = time.perf_counter()
        outcome = run_evaluation(
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
            results = outcome.results(config)
            accuracy = outcome.accuracy
            lines = [
                f"Dataset: {description}; {outcome.images} images, "
                f"{int(next(iter(results.values()))['pairs'])} (image, target) pairs.",
                f"Model: `{args.model}`"
                + (
                    f"; classification accuracy (all labels right): {accuracy:.1f} %."
                    if not math.isnan(accuracy)
                    else "."
                ),
                f"Pointing game within {config.tolerance_for(*loaded.image_size)} px; maps "
                f"binarised at {config.threshold} for mIoU / pixel accuracy; perturbation AUCs "
                "are areas × 100 over 0–90 % of patches removed (model accuracy on the target).",
            ]
            table = write_report(args.out, "captum-legrad eval", lines, results)
            if not args.no_plots:
                save_curves(args.out / "curves.png", outcome)
                save_examples(args.out / "examples.png", loaded, outcome, classes=classes)
            print("\n".join(lines))
            print()
            print(table)
            print(f"\nwrote {args.out}/results.md, results.csv ({seconds:.1f} s)")
    finally:
        distributed.finish()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``captum-legrad demo``: the bundled model, LeGrad beside the baselines."""
    import torch

    from .eval.batches import shapes_batches
    from .eval.distributed import Context
    from .eval.harness import METHOD_NAMES
    from .eval.report import save_curves, save_examples, write_report
    from .eval.runner import run_evaluation

    start = time.perf_counter()
    torch.manual_seed(0)
    loaded = _load("default", None)
    config = _eval_config(loaded, "0.5", True, 0, None)
    factories, classes = shapes_batches(loaded, args.num_images, 50, args.seed, torch.device("cpu"))
    context = Context(rank=0, world=1, device=torch.device("cpu"))
    outcome = run_evaluation(
        loaded.model,
        factories,
        list(METHOD_NAMES),
        config,
        context,
        show_progress=not args.quiet,
        examples=args.examples,
    )
    lines = [
        f"Bundled shapes ViT on {outcome.images} held-out images "
        f"(classification accuracy {outcome.accuracy:.1f} %).",
    ]
    table = write_report(args.out, "captum-legrad demo", lines, outcome.results(config))
    save_curves(args.out / "curves.png", outcome)
    save_examples(
        args.out / "demo.png",
        loaded,
        outcome,
        methods=("legrad", "gae", "gradcam"),
        classes=classes,
    )
    print(lines[0])
    print()
    print(table)
    print(f"\nwrote {args.out}/demo.png, results.md ({time.perf_counter() - start:.1f} s)")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    """``captum-legrad explain``: overlays and ``.npy`` maps for image files."""
    import numpy as np
    import torch

    from . import viz
    from .attribution import LeGrad
    from .eval.datasets import load_image, resize_image
    from .eval.progress import progress_bar

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
            viz.overlay(image, maps[k], title=name, save=args.out / f"{stem}.png")
        bar.update(1)
    bar.close()
    print(f"wrote {len(files) * len(names)} overlays (.png) and maps (.npy) to {args.out}")
    return 0


def cmd_app(args: argparse.Namespace) -> int:
    """``captum-legrad app``: the interactive explorer in the browser."""
    from .app import ExplorerError, launch

    if args.host not in ("127.0.0.1", "localhost"):
        print(
            f"captum-legrad: the explorer will be reachable from other machines on {args.host}",
            file=sys.stderr,
        )
    try:
        launch(args.model, args.weights, host=args.host, port=args.port)
    except (ExplorerError, ImportError) as error:
        raise CLIError(str(error)) from error
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``captum-legrad``."""
    from .eval.harness import METHOD_NAMES
    from .eval.models import model_choices

    methods = ", ".join(METHOD_NAMES)
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
    explain.add_argument("--model", required=True, help=model_choices())
    explain.add_argument("--weights", type=Path, help=".safetensors or torch.save state dict")
    explain.add_argument("--num-classes", type=int, help="size of the classifier head")
    what = explain.add_mutually_exclusive_group(required=True)
    what.add_argument("--target", type=int, nargs="+", help="class index(es) to explain")
    what.add_argument("--prompt", nargs="+", help="text prompt(s) (image-text models)")
    explain.add_argument("--layers", type=int, nargs="+", help="block indices (default: all)")
    explain.add_argument("--out", type=Path, required=True)
    explain.add_argument("--quiet", action="store_true", help="no progress bar")
    explain.set_defaults(func=cmd_explain)

    explorer = sub.add_parser("app", help="the interactive LeGrad explorer (Gradio, app extra)")
    explorer.add_argument("--model", default="default", help=model_choices())
    explorer.add_argument("--weights", type=Path, help=".safetensors or torch.save state dict")
    explorer.add_argument(
        "--host", default="127.0.0.1", help="interface to bind; 0.0.0.0 makes it public"
    )
    explorer.add_argument("--port", type=int, help="port (default: the first free from 7860)")
    explorer.set_defaults(func=cmd_app)

    ev = sub.add_parser("eval", help="localisation and perturbation metrics, LeGrad vs baselines")
    ev.add_argument("--dataset", choices=("shapes", "imagenet-seg", "openimages"), required=True)
    ev.add_argument("--data", type=Path, help="gtsegs_ijcv.mat or the point-label CSV")
    ev.add_argument("--images", type=Path, help="openimages: folder of <ImageId>.jpg")
    ev.add_argument("--class-descriptions", type=Path, help="openimages: LabelName,DisplayName CSV")
    ev.add_argument("--model", default="default", help=model_choices())
    ev.add_argument("--weights", type=Path)
    ev.add_argument("--num-classes", type=int)
    ev.add_argument("--methods", nargs="+", metavar="METHOD", help=f"subset of {methods}")
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
