"""The ``captum-legrad`` command line: ``demo``, ``explain``, ``eval`` and ``app``.

    captum-legrad demo --out out/demo
    captum-legrad explain cat.jpg --model timm:vit_base_patch16_224 --out out/explain
    captum-legrad explain photos/ --model timm:vit_base_patch16_224 --target "tabby cat" 281
        --out out/explain
    captum-legrad explain photos/ --model open_clip:ViT-B-16/openai \\
        --prompt "a cat" "a remote" --out out/explain
    captum-legrad explain cat.jpg --model timm:vit_base_patch16_224 --weights vit.safetensors \\
        --out out/explain
    captum-legrad eval --dataset shapes --out out/eval
    torchrun --nproc_per_node 4 -m captum_legrad.cli eval --dataset imagenet-seg \\
        --data gtsegs_ijcv.mat --model timm:vit_base_patch16_224 --weights vit.pth --out out/seg

This module only parses arguments and calls functions: models come from
:mod:`captum_legrad.eval.models` (one loader per family of the registry), the explain
pipeline from :mod:`captum_legrad.eval.explain`, data from :mod:`captum_legrad.eval.batches`,
the evaluation from :mod:`captum_legrad.eval.runner` and the files from
:mod:`captum_legrad.eval.report`, :mod:`captum_legrad.eval.files` and :mod:`captum_legrad.viz`.
Nothing here imports torch at module level, so ``--help`` is instant.

Errors in what was asked (a missing or unreadable file, an unknown model or class, weights
that do not fit, pretrained weights that cannot be downloaded, an output folder that cannot
be written, a device that is not there) end the program with exit code 2 and one line on
stderr, before any work where they can be known before; folders the run created are
removed again when it fails. Files are written under a temporary name and renamed when
complete.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterator, NoReturn, Optional, Sequence

__all__ = ["main", "build_parser", "CLIError", "METHOD_NAMES"]

#: The evaluation's methods (``captum_legrad.eval.harness.METHOD_NAMES``; kept here so that
#: building the parser imports no torch; a test checks that both agree).
METHOD_NAMES = (
    "legrad",
    "gae",
    "gradcam",
    "rollout",
    "attention",
    "saliency",
    "inputxgradient",
    "ig",
)

DEFAULT_MODEL_HELP = (
    "'default' is the bundled tiny ViT trained on synthetic 64×64 shapes (circle, square, "
    "triangle, cross, ring), for the demo and tests; it means nothing on photos"
)


class CLIError(Exception):
    """A problem with what the user asked for: reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors reported in one line (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default (options without one say so in their help)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action) or text


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Turn the library's errors about what was asked into :class:`CLIError`."""
    from .eval.batches import DataError
    from .eval.explain import ExplainError
    from .eval.files import OutputError
    from .eval.models import ModelError

    try:
        yield
    except (ModelError, ExplainError, OutputError, DataError) as error:
        raise CLIError(str(error)) from error


def _device(text: str) -> Any:
    """``--device``: auto, cpu, cuda, cuda:N; a GPU that is not there is an error."""
    import torch

    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as error:
        raise CLIError(f"--device {text!r} is not a device: use auto, cpu or cuda") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(
                f"--device {text}: no CUDA GPU is available here "
                "(torch.cuda.is_available() is False); use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"--device {text}: there are only {torch.cuda.device_count()} GPUs here")
    elif device.type != "cpu":
        backend = getattr(torch.backends, device.type, None)
        if backend is None or not backend.is_available():
            raise CLIError(f"--device {text}: not available here; use --device cpu")
    return device


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


def _load(args: argparse.Namespace) -> Any:
    from .eval.models import ModelError, load_model

    loaded = load_model(
        args.model, args.weights, args.num_classes, random_weights=args.random_weights
    )
    size = getattr(args, "image_size", None)
    if size:
        try:
            loaded = loaded.at_size((size[0], size[-1]))
        except ModelError as error:
            raise CLIError(str(error)) from error
    return loaded


def _written(out: Path, files: Sequence[Path]) -> str:
    return f"wrote {len(files)} files to {out}:\n" + "\n".join(f"  {p.name}" for p in files)


# --------------------------------------------------------------------------- commands


def cmd_eval(args: argparse.Namespace) -> int:
    """``captum-legrad eval``: metric table of LeGrad and the baselines on a data set."""
    import torch

    from .eval import distributed
    from .eval.batches import (
        PROMPT_TEMPLATE,
        imagenet_seg_batches,
        openimages_batches,
        shapes_batches,
    )
    from .eval.files import OutputFolder
    from .eval.report import save_curves, save_examples, write_report
    from .eval.runner import run_evaluation

    methods = list(args.methods or METHOD_NAMES)
    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown:
        raise CLIError(
            f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHOD_NAMES)}"
        )
    if args.dataset == "imagenet-seg" and args.data is None:
        raise CLIError("--dataset imagenet-seg needs --data gtsegs_ijcv.mat")
    if args.dataset == "openimages" and args.data is None:
        raise CLIError("--dataset openimages needs --data POINT_LABELS.csv")
    threshold_check = args.threshold
    if threshold_check != "mean":
        try:
            float(threshold_check)
        except ValueError as error:
            raise CLIError(
                f"--threshold must be a number or 'mean', got {threshold_check!r}"
            ) from error
    device = _device(args.device)
    out = OutputFolder(args.out)
    context = distributed.init(str(device))
    try:
        torch.manual_seed(0)
        loaded = _load(args)
        loaded.model.to(context.device)
        model = loaded.model
        classes: Any = loaded.classes
        perturbation = not args.no_perturbation
        points = 0
        if args.dataset == "shapes":
            factories, classes = shapes_batches(
                loaded, args.num_images or 1000, args.batch_size, args.seed, context.device
            )
            description = f"shapes test split (seed {args.seed})"
        elif args.dataset == "imagenet-seg":
            factories = imagenet_seg_batches(
                loaded, args.data, args.num_images, args.batch_size, context.device
            )
            description = (
                f"ImageNet-segmentation ({args.data.name}), explaining the predicted class"
            )
        else:
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
            kind = (
                "every label right (exact set of present shapes)" if loaded.multilabel else "top-1"
            )
            lines = [
                f"Dataset: {description}; {outcome.images} images, "
                f"{int(next(iter(results.values()))['pairs'])} (image, target) pairs.",
                f"Model: `{args.model}` ({loaded.weights or 'weights as loaded'})"
                + (
                    f"; classification accuracy, {kind}: {accuracy:.1f} %."
                    if not math.isnan(accuracy)
                    else "."
                ),
                f"Pointing game within {config.tolerance_for(*loaded.image_size)} px; maps "
                f"binarised at {config.threshold} for mIoU / pixel accuracy; perturbation AUCs "
                "are areas × 100 over 0–90 % of patches removed (model accuracy on the target).",
                f"Computed on {context.device.type} with {torch.get_num_threads()} torch "
                f"thread(s) × {context.world} process(es).",
            ]
            table = write_report(args.out, "captum-legrad eval", lines, results)
            files = [args.out / "results.md", args.out / "results.csv"]
            if not args.no_plots:
                if save_curves(args.out / "curves.png", outcome, title=description):
                    files.append(args.out / "curves.png")
                if save_examples(args.out / "examples.png", loaded, outcome, classes=classes):
                    files.append(args.out / "examples.png")
            print("\n".join(lines))
            print()
            print(table)
            print(f"\n{_written(args.out, files)}\n({seconds:.1f} s)")
    except BaseException:
        out.cleanup()
        raise
    finally:
        distributed.finish()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``captum-legrad demo``: the bundled model, LeGrad beside the baselines."""
    import torch

    from .eval.batches import shapes_batches
    from .eval.distributed import Context
    from .eval.files import OutputFolder
    from .eval.models import load_model
    from .eval.report import save_curves, save_examples, write_report
    from .eval.runner import run_evaluation

    start = time.perf_counter()
    out = OutputFolder(args.out)
    try:
        torch.manual_seed(0)
        loaded = load_model("default")
        config = _eval_config(loaded, "0.5", True, 0, None)
        # small batches: the progress bar moves while the methods run
        factories, classes = shapes_batches(
            loaded, args.num_images, 4, args.seed, torch.device("cpu")
        )
        context = Context(rank=0, world=1, device=torch.device("cpu"))
        if not args.quiet:
            print(
                f"demo: LeGrad and {len(METHOD_NAMES) - 1} baselines on {args.num_images} "
                "held-out shapes images (bundled 64×64 model, CPU)",
                file=sys.stderr,
            )
        outcome = run_evaluation(
            loaded.model,
            factories,
            list(METHOD_NAMES),
            config,
            context,
            show_progress=not args.quiet,
            examples=args.examples,
            description="demo: explaining and perturbing, batches of 4 images",
        )
        lines = [
            f"Bundled shapes ViT on {outcome.images} held-out images; classification accuracy "
            f"{outcome.accuracy:.1f} % (every label right, on these {outcome.images} images; "
            "93.9 % on the 1000 of the full table).",
        ]
        table = write_report(args.out, "captum-legrad demo", lines, outcome.results(config))
        files = [args.out / "results.md", args.out / "results.csv"]
        if save_curves(args.out / "curves.png", outcome, title="Perturbation curves (demo)"):
            files.append(args.out / "curves.png")
        if args.examples and save_examples(
            args.out / "demo.png",
            loaded,
            outcome,
            methods=("legrad", "gae", "gradcam"),
            classes=classes,
            title="LeGrad beside Chefer GAE and GradCAM (white: the object's outline)",
        ):
            files.append(args.out / "demo.png")
    except BaseException:
        out.cleanup()
        raise
    print(lines[0])
    print()
    print(table)
    print(f"\n{_written(args.out, files)}\n({time.perf_counter() - start:.1f} s)")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    """``captum-legrad explain``: LeGrad maps of photos, on the photos."""
    from .eval.explain import check_photos, explain_photos, image_files, read_labels, summary_lines
    from .eval.files import OutputFolder
    from .eval.progress import progress_bar

    if args.top_k < 1:
        raise CLIError(f"--top-k must be at least 1, got {args.top_k}")
    files = image_files(args.input)
    check_photos(files)
    labels = read_labels(args.labels) if args.labels is not None else None
    device = _device(args.device)
    out = OutputFolder(args.out)

    def warn(message: str) -> None:
        print(f"captum-legrad: warning: {message}", file=sys.stderr)

    if args.ask is not None:
        return _ask(args, files, out)
    try:
        loaded = _load(args)
        bar = progress_bar(len(files), "explain: photos", disable=args.quiet or len(files) == 1)
        results = explain_photos(
            loaded,
            files,
            out,
            targets=args.target,
            prompts=args.prompt,
            top_k=args.top_k,
            labels=labels,
            layers=args.layers,
            fmt=args.format,
            device=device,
            warn=warn,
            progress=bar.update,
        )
        bar.close()
    except BaseException:
        out.cleanup()
        raise
    print(f"model {args.model}, weights: {loaded.weights}")
    print("\n".join(summary_lines(results, args.out)))
    return 0


def _ask(args: argparse.Namespace, files: Sequence[Path], out: Any) -> int:
    """``explain --ask``: a vision-language model's answer, one map per token."""
    from .eval.ask import ask_photos, load_vlm
    from .eval.models import ModelError

    if not args.ask.strip():
        raise CLIError("--ask needs a question")
    try:
        model, processor = load_vlm(args.model, args.random_weights)
        answers = ask_photos(
            model,
            processor,
            files,
            out,
            args.ask,
            answer=args.answer,
            max_new_tokens=args.max_new_tokens,
            layers=args.layers,
            fmt=args.format,
        )
    except ModelError as error:
        out.cleanup()
        raise CLIError(str(error)) from error
    except BaseException:
        out.cleanup()
        raise
    for path, text in answers:
        print(f"{path.name}: {args.ask} → {text}")
    print(out.summary())
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
        launch(
            args.model,
            args.weights,
            host=args.host,
            port=args.port,
            random_weights=args.random_weights,
            explain_size=tuple(args.image_size[:2]) if args.image_size else None,
        )
    except (ExplorerError, ImportError) as error:
        raise CLIError(str(error)) from error
    except KeyboardInterrupt:
        # launch() has closed the server and removed its temporary folders
        print("captum-legrad: explorer stopped (Ctrl+C)", file=sys.stderr, flush=True)
        return 130
    return 0


# --------------------------------------------------------------------------- parser


def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value


def _positive(text: str) -> int:
    return _whole_number(text, 1)


def _non_negative(text: str) -> int:
    return _whole_number(text, 0)


def _model_help() -> str:
    from .families import FAMILIES

    names = " | ".join(f"{row.name}:{row.name_hint}" for row in FAMILIES if row.loader)
    return (
        f"default | {names}. Pretrained weights by their usual names: timm:vit_base_patch16_224, "
        "open_clip:ViT-B-16/openai (NAME/TAG), hf:google/siglip2-base-patch16-224 (or a local "
        f"folder), torchvision:vit_b_16. {DEFAULT_MODEL_HELP}"
    )


def _weights_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--weights",
        type=Path,
        help="local weights (.safetensors or a torch.save state dict) instead of downloading "
        "the pretrained ones",
    )
    group.add_argument(
        "--random-weights",
        action="store_true",
        help="use random weights (no download); the maps then show nothing learned",
    )
    parser.add_argument(
        "--num-classes",
        type=_positive,
        help="size of the classifier head, for --weights of a fine-tuned model "
        "(default: the model's own)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``captum-legrad`` (imports no torch)."""
    model_help = _model_help()
    parser = _Parser(
        prog="captum-legrad",
        description="LeGrad explanations for Vision Transformers (Captum): demo, explain, eval.",
        formatter_class=_Formatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="offline demo on the bundled shapes model (under a minute)",
        description="LeGrad beside the baselines on the bundled synthetic-shapes model: a "
        "metric table, perturbation curves and example overlays. Needs no download.",
        formatter_class=_Formatter,
    )
    demo.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder")
    demo.add_argument("--num-images", type=_positive, default=24, help="images in the table")
    demo.add_argument("--examples", type=_non_negative, default=6, help="rows in demo.png")
    demo.add_argument("--seed", type=int, default=1, help="dataset seed (1 = the test split)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=cmd_demo)

    explain = sub.add_parser(
        "explain",
        help="LeGrad maps of photos: figures and .npy maps at the photos' resolution",
        description="Explain what a ViT sees in photos. Each photo is preprocessed as the "
        "model expects (resize, centre crop); the maps are projected back onto the photo "
        "(NaN where the crop cut it away) and saved as PHOTO_TARGET.npy and one figure per "
        "photo (the photo, then one overlay per target with its score and a colour bar). "
        "Without --target or --prompt the model's top-k predicted classes are explained.",
        formatter_class=_Formatter,
    )
    explain.add_argument("input", type=Path, help="an image file or a folder of images")
    explain.add_argument("--model", required=True, help=model_help)
    _weights_options(explain)
    what = explain.add_mutually_exclusive_group()
    what.add_argument(
        "--target",
        nargs="+",
        metavar="CLASS",
        help='class indices or names (e.g. 281 "tabby cat"), resolved through the model\'s '
        "labels or --labels (default: the top-k predicted classes)",
    )
    what.add_argument(
        "--ask",
        metavar="QUESTION",
        help="a vision-language model (--model hf:..., LLaVA-1.5 / PaliGemma / Gemma 3): "
        "explain its answer to QUESTION, one map per answer token",
    )
    what.add_argument(
        "--prompt", nargs="+", metavar="TEXT", help="text prompts (image-text models)"
    )
    explain.add_argument(
        "--top-k",
        type=int,
        default=1,
        help="without --target/--prompt: explain this many "
        "of the highest-scoring classes per photo",
    )
    explain.add_argument(
        "--labels", type=Path, help="class names, one per line (line i names class i)"
    )
    explain.add_argument(
        "--layers", type=int, nargs="+", help="block indices for LeGrad (default: all blocks)"
    )
    explain.add_argument(
        "--format", choices=("png", "jpg", "pdf"), default="png", help="figure file format"
    )
    explain.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    explain.add_argument(
        "--image-size",
        type=_positive,
        nargs="+",
        metavar="PIXELS",
        help="explain at this input size (H [W]), e.g. 448 on a 224 model for finer maps; "
        "the position embedding is resampled for the call (default: the model's own)",
    )
    explain.add_argument("--answer", help="with --ask: explain this answer (default: generated)")
    explain.add_argument(
        "--max-new-tokens", type=_positive, default=32, help="with --ask: longest answer"
    )
    explain.add_argument("--out", type=Path, required=True, help="output folder")
    explain.add_argument("--quiet", action="store_true", help="no progress bar or notes")
    explain.set_defaults(func=cmd_explain)

    explorer = sub.add_parser(
        "app",
        help="the interactive LeGrad explorer in the browser (Gradio, app extra)",
        description="Upload photos, pick classes or prompts, see LeGrad's maps (docs/app.md).",
        formatter_class=_Formatter,
    )
    explorer.add_argument("--model", default="default", help=model_help)
    explorer.add_argument(
        "--weights", type=Path, help="local weights (.safetensors or a torch.save state dict)"
    )
    explorer.add_argument(
        "--host", default="127.0.0.1", help="interface to bind; 0.0.0.0 makes it public"
    )
    explorer.add_argument("--port", type=int, help="port (default: the first free from 7860)")
    explorer.add_argument(
        "--image-size",
        type=_positive,
        nargs="+",
        metavar="PIXELS",
        help="explain at this input size (H [W]), e.g. 448 on a 224 model for finer maps; "
        "the position embedding is resampled for the call (default: the model's own)",
    )
    explorer.add_argument(
        "--random-weights",
        action="store_true",
        help="use random weights instead of the pretrained ones (nothing learned is shown)",
    )
    explorer.set_defaults(func=cmd_app)

    ev = sub.add_parser(
        "eval",
        help="localisation and perturbation metrics, LeGrad vs baselines",
        description="The metric table of LeGrad and the baselines on a data set "
        "(docs/evaluation.md); runs unchanged under torchrun.",
        formatter_class=_Formatter,
    )
    ev.add_argument(
        "--dataset",
        choices=("shapes", "imagenet-seg", "openimages"),
        required=True,
        help="shapes: the bundled synthetic set; imagenet-seg: gtsegs_ijcv.mat; openimages: "
        "OpenImagesV7 point labels",
    )
    ev.add_argument("--data", type=Path, help="gtsegs_ijcv.mat or the point-label CSV")
    ev.add_argument("--images", type=Path, help="openimages: folder of <ImageId>.jpg")
    ev.add_argument("--class-descriptions", type=Path, help="openimages: LabelName,DisplayName CSV")
    ev.add_argument("--model", default="default", help=model_help)
    _weights_options(ev)
    ev.add_argument(
        "--methods",
        nargs="+",
        metavar="METHOD",
        help=f"a subset of {', '.join(METHOD_NAMES)} (default: all)",
    )
    ev.add_argument(
        "--num-images", type=_positive, help="shapes: default 1000; others: default all"
    )
    ev.add_argument("--batch-size", type=_positive, default=50, help="images per batch")
    ev.add_argument("--seed", type=int, default=1, help="shapes: dataset seed (1 = test split)")
    ev.add_argument("--threshold", default="0.5", help="binarisation threshold, or 'mean'")
    ev.add_argument(
        "--pointing-tolerance",
        type=_non_negative,
        help="pointing-game tolerance in pixels (default: 15 at 224, scaled to the input)",
    )
    ev.add_argument("--no-perturbation", action="store_true", help="skip perturbation tests")
    ev.add_argument("--no-plots", action="store_true", help="no curves.png / examples.png")
    ev.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ev.add_argument(
        "--image-size",
        type=_positive,
        nargs="+",
        metavar="PIXELS",
        help="explain at this input size (H [W]), e.g. 448 on a 224 model for finer maps; "
        "the position embedding is resampled for the call (default: the model's own)",
    )
    ev.add_argument("--out", type=Path, required=True, help="output folder")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(func=cmd_eval)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``captum-legrad``; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help (0) or a usage error (2, reported in one line)
        return int(stop.code or 0)
    try:
        with _user_errors():
            code: int = args.func(args)
    except CLIError as error:
        print(f"captum-legrad: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
