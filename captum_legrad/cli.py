"""The ``captum-legrad`` command line: ``demo``, ``explain``, ``eval`` and ``app``.

    captum-legrad demo --out out/demo
    captum-legrad explain cat.jpg --model timm:vit_base_patch16_224 --out out/explain
    captum-legrad explain photos/ --model timm:vit_base_patch16_224 --target "tabby cat" 281
        --out out/explain
    captum-legrad explain photos/ --model open_clip:ViT-B-16/openai \\
        --prompt "a cat" "a remote" --out out/explain
    captum-legrad explain query.jpg --like a.jpg b.jpg --model timm:vit_base_patch16_224 \\
        --out out/like
    captum-legrad eval --dataset shapes --out out/eval
    torchrun --nproc_per_node 4 -m captum_legrad.cli eval --dataset imagenet-seg \\
        --data gtsegs_ijcv.mat --model timm:vit_base_patch16_224 --weights vit.pth --out out/seg

This module parses the arguments, checks the few that need no model (``--device``,
``--threshold``, ``--top-k``) and calls one function per command: ``eval`` and ``demo``
:func:`captum_legrad.eval.commands.run_eval` / :func:`~captum_legrad.eval.commands.run_demo`,
``explain`` :func:`captum_legrad.eval.explain.explain_photos` (``--like``:
:func:`captum_legrad.eval.like.explain_like`; ``--ask``:
:func:`captum_legrad.eval.ask.ask_photos`), ``app`` :func:`captum_legrad.app.launch`. It
prints what they return and turns their errors into exit codes. Nothing here imports torch
at module level, so ``--help`` and ``--version`` are instant.

Exit codes: 0 done; 1 ``explain`` explained every readable image but some could not be
read (listed at the end; ``--strict`` refuses them at once instead); 2 an error in what was
asked (a missing or unreadable file, an unknown model or class, weights that do not fit,
pretrained weights that cannot be downloaded, an output folder that cannot be written, a
device that is not there), reported in one line on stderr, before any work where it can be
known before; 130 interrupted (Ctrl-C), reported in one line. Files are written under a
temporary name and renamed when complete (with the mode the umask gives); a failed or
interrupted run leaves every image's outputs complete or absent (``explain``) or nothing
(``eval``, ``demo``), and removes the folders it created when they stay empty.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, List, NoReturn, Optional, Sequence, Tuple

__all__ = ["main", "build_parser", "CLIError", "Interrupted", "METHOD_NAMES"]

#: Exit code when some images of ``explain`` could not be read (the others were explained).
EXIT_UNREADABLE = 1
#: Exit code for an error in what was asked.
EXIT_USAGE = 2
#: Exit code after Ctrl-C (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130

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


class Interrupted(Exception):
    """Ctrl-C, with what was done by then: reported in one line, exit code 130."""


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
    from .eval.classes import ClassNameError
    from .eval.explain import ExplainError
    from .eval.files import OutputError
    from .eval.media import MediaError
    from .eval.models import ModelError

    try:
        yield
    except (ModelError, ExplainError, OutputError, DataError, ClassNameError, MediaError) as error:
        raise CLIError(str(error)) from error


@contextlib.contextmanager
def _whole_or_nothing(out: Any, interrupted: Callable[[], str]) -> Iterator[None]:
    """Remove what ``out`` wrote when the command fails; Ctrl-C becomes :class:`Interrupted`
    with the line ``interrupted()`` gives (the library's errors are turned into
    :class:`CLIError` by :func:`_user_errors` around every command)."""
    try:
        yield
    except KeyboardInterrupt:
        out.cleanup()
        raise Interrupted(interrupted()) from None
    except BaseException:
        out.cleanup()
        raise


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


def _threshold(text: str) -> Any:
    """``--threshold``: a number or ``mean``."""
    if text == "mean":
        return text
    try:
        return float(text)
    except ValueError as error:
        raise CLIError(f"--threshold must be a number or 'mean', got {text!r}") from error


def _image_size(args: argparse.Namespace) -> Optional[Tuple[int, int]]:
    size = getattr(args, "image_size", None)
    return (size[0], size[-1]) if size else None


def _say(args: argparse.Namespace) -> Any:
    """Where notes go: stderr, or nowhere under ``--quiet``."""
    if getattr(args, "quiet", False):
        return None
    return lambda message: print(message, file=sys.stderr, flush=True)


def _load(args: argparse.Namespace) -> Any:
    from .eval.models import load_model

    announce = _say(args)
    loaded = load_model(
        args.model,
        args.weights,
        args.num_classes,
        random_weights=args.random_weights,
        announce=announce,
    )
    size = _image_size(args)
    return loaded.at_size(size) if size else loaded


# --------------------------------------------------------------------------- commands


def cmd_eval(args: argparse.Namespace) -> int:
    """``captum-legrad eval``: metric table of LeGrad and the baselines on a data set."""
    from .eval.commands import EvalRequest, check_request, run_eval

    request = EvalRequest(
        dataset=args.dataset,
        out=args.out,
        model=args.model,
        weights=args.weights,
        num_classes=args.num_classes,
        random_weights=args.random_weights,
        image_size=_image_size(args),
        data=args.data,
        images=args.images,
        class_descriptions=args.class_descriptions,
        methods=tuple(args.methods or METHOD_NAMES),
        num_images=args.num_images,
        batch_size=args.batch_size,
        seed=args.seed,
        threshold=_threshold(args.threshold),
        pointing_tolerance=args.pointing_tolerance,
        perturbation=not args.no_perturbation,
        plots=not args.no_plots,
        quiet=args.quiet,
    )
    check_request(request)
    device = _device(args.device)
    try:
        report = run_eval(request, device)
    except KeyboardInterrupt:
        raise Interrupted(
            "interrupted: nothing written (results.md / results.csv removed)"
        ) from None
    if report is not None:
        print(report.text())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``captum-legrad demo``: the bundled model, LeGrad beside the baselines."""
    from .eval.commands import run_demo

    try:
        report = run_demo(args.out, args.num_images, args.examples, args.seed, args.quiet)
    except KeyboardInterrupt:
        raise Interrupted("interrupted: nothing written") from None
    print(report.text())
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    """``captum-legrad explain``: LeGrad maps of photos, on the photos."""
    from .eval.explain import (
        check_photos,
        explain_photos,
        image_files,
        read_labels,
        readable_photos,
        summary_lines,
    )
    from .eval.files import OutputFolder
    from .eval.progress import progress_bar

    if args.top_k < 1:
        raise CLIError(f"--top-k must be at least 1, got {args.top_k}")
    kind = _media_input(args.input)
    if kind == "video" and args.ask is not None:
        return _ask_video(args)
    if kind is not None:
        return _explain_media(args, kind)
    if args.like is not None:
        return _like(args)
    files = image_files(args.input)
    # --ask and a single image: an unreadable image is an error at once
    single = args.input.is_file() or args.ask is not None
    unreadable: List[Tuple[Path, str]] = []
    if args.strict or single:
        check_photos(files)
    else:
        files, unreadable = readable_photos(files)
        if not files:
            listed = "; ".join(f"{p.name}: {why}" for p, why in unreadable)
            raise CLIError(
                f"none of the {len(unreadable)} images in {args.input} can be read ({listed})"
            )
    labels = read_labels(args.labels) if args.labels is not None else None
    device = _device(args.device)
    out = OutputFolder(args.out)
    say = _say(args)

    def warn(message: str) -> None:  # also under --quiet
        print(f"captum-legrad: warning: {message}", file=sys.stderr, flush=True)

    def note(message: str) -> None:  # silenced by --quiet
        if say is not None:
            say(f"captum-legrad: warning: {message}")

    if args.ask is not None:
        return _ask(args, files, out)
    done = [0]

    def step(n: int) -> None:
        done[0] += n
        bar.update(n)

    bar: Any = None
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
            note=note,
            progress=step,
            model_name=args.model,
            on_unreadable=None
            if (args.strict or single)
            else lambda p, why: unreadable.append((p, why)),
        )
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        out.cleanup()
        total = len(files) + len(unreadable)
        raise Interrupted(f"interrupted: {done[0]} of {total} images written") from None
    except BaseException:
        if bar is not None:
            bar.close()
        out.cleanup()
        raise
    bar.close()
    print(f"model {args.model}, weights: {loaded.weights}")
    print("\n".join(summary_lines(results, args.out)))
    if unreadable:
        print(
            f"captum-legrad: {len(unreadable)} of {len(results) + len(unreadable)} images "
            "could not be read and were skipped:",
            file=sys.stderr,
        )
        for path, why in unreadable:
            print(f"  {path}: {why}", file=sys.stderr)
        return EXIT_UNREADABLE
    return 0


def _like(args: argparse.Namespace) -> int:
    """``explain QUERY --like REF ...``: why QUERY is similar to each reference."""
    from .eval.explain import ExplainError
    from .eval.files import OutputFolder
    from .eval.like import explain_like, like_lines

    conflicting = [
        flag
        for flag, value in (
            ("--target", args.target),
            ("--prompt", args.prompt),
            ("--ask", args.ask),
            ("--labels", args.labels),
        )
        if value is not None
    ]
    if conflicting:
        raise CLIError(f"--like explains similarities: drop {', '.join(conflicting)}")
    if not args.input.is_file():
        raise ExplainError(f"--like needs one query image file: no such image {args.input}")
    missing = [p for p in args.like if not p.is_file()]
    if missing:
        raise ExplainError(f"--like: no such reference image: {missing[0]}")
    device = _device(args.device)
    out = OutputFolder(args.out)
    with _whole_or_nothing(out, lambda: "interrupted: 0 of 1 images written"):
        loaded = _load(args)
        result = explain_like(
            loaded,
            args.input,
            list(args.like),
            out,
            model_name=args.model,
            layers=args.layers,
            fmt=args.format,
            device=device,
            warn=lambda m: print(f"captum-legrad: warning: {m}", file=sys.stderr, flush=True),
        )
    print(f"model {args.model}, weights: {loaded.weights}")
    print("\n".join(like_lines(result, args.out)))
    return 0


def _media_input(path: Path) -> Optional[str]:
    """``"video"`` or ``"audio"`` for such a file (extension, else content), else None."""
    from .eval.explain import IMAGE_EXTENSIONS
    from .eval.media import media_kind

    return media_kind(path, IMAGE_EXTENSIONS)


def _explain_media(args: argparse.Namespace, kind: str) -> int:
    """``explain clip.mp4`` / ``explain sound.wav``: an HF video or audio classifier."""
    from .eval.explain import read_labels
    from .eval.explain_media import explain_media, load_media_model, media_summary
    from .eval.files import OutputFolder
    from .eval.media import check_media

    for given, option in (
        (args.prompt, "--prompt"),
        (args.ask, "--ask"),
        (args.image_size, "--image-size"),
        (args.weights, "--weights"),
        (args.num_classes, "--num-classes"),
    ):
        if given is not None:
            raise CLIError(f"{option} does not apply to a {kind} file ({args.input.name})")
    check_media(args.input, kind)  # a bad file stops the run before the model loads
    labels = read_labels(args.labels) if args.labels is not None else None
    device = _device(args.device)
    out = OutputFolder(args.out)

    def warn(message: str) -> None:
        if not args.quiet:
            print(f"captum-legrad: warning: {message}", file=sys.stderr)

    # The files of one video or sound are written all or nothing (save_media).
    with _whole_or_nothing(out, lambda: "interrupted: nothing written"):
        loaded = load_media_model(args.model, kind, random_weights=args.random_weights)
        result = explain_media(
            loaded,
            args.input,
            out,
            targets=args.target,
            top_k=args.top_k,
            labels=labels,
            layers=args.layers,
            animation=args.animation,
            fmt=args.format,
            device=device,
            warn=warn,
        )
    print(f"model {args.model}, weights: {loaded.weights}")
    print("\n".join(media_summary(result, args.out)))
    return 0


def _ask(args: argparse.Namespace, files: Sequence[Path], out: Any) -> int:
    """``explain --ask``: a vision-language model's answer, one map per token."""
    from .eval.ask import ask_photos, load_vlm

    if not args.ask.strip():
        raise CLIError("--ask needs a question")
    with _whole_or_nothing(out, lambda: f"interrupted: {len(out.written)} files written"):
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
    for path, text in answers:
        print(f"{path.name}: {args.ask} → {text}")
    print(out.summary())
    return 0


def _ask_video(args: argparse.Namespace) -> int:
    """``explain clip.mp4 --ask``: a video VLM's answer (Qwen-VL), a frame strip per token."""
    from .eval.ask import ask_video, load_vlm
    from .eval.files import OutputFolder
    from .eval.media import check_media

    if not args.ask.strip():
        raise CLIError("--ask needs a question")
    for given, option in (
        (args.prompt, "--prompt"),
        (args.image_size, "--image-size"),
        (args.weights, "--weights"),
        (args.num_classes, "--num-classes"),
    ):
        if given is not None:
            raise CLIError(f"{option} does not apply to --ask ({args.input.name})")
    check_media(args.input, "video")  # a bad file stops the run before the model loads
    out = OutputFolder(args.out)
    with _whole_or_nothing(out, lambda: f"interrupted: {len(out.written)} files written"):
        model, processor = load_vlm(args.model, args.random_weights)
        text = ask_video(
            model,
            processor,
            args.input,
            out,
            args.ask,
            answer=args.answer,
            max_new_tokens=args.max_new_tokens,
            layers=args.layers,
            fmt=args.format,
        )
    print(f"{args.input.name}: {args.ask} → {text}")
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
        return EXIT_INTERRUPTED
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


def _version() -> str:
    """The installed version, read without importing the package's torch modules."""
    try:
        from importlib.metadata import version

        return version("captum-legrad")
    except Exception:  # not installed (a source checkout): the package's own constant
        import re

        text = (Path(__file__).parent / "__init__.py").read_text(encoding="utf-8")
        found = re.search(r"__version__\s*=\s*[\"']([^\"']+)", text)
        return found.group(1) if found else "unknown"


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
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
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
    explain.add_argument(
        "input",
        type=Path,
        help="an image file or a folder of images; or a video (.mp4, ...) or audio file "
        "(.wav, ...) with --model hf:VIDEO_OR_AUDIO_CLASSIFIER",
    )
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
    what.add_argument(
        "--like",
        nargs="+",
        type=Path,
        metavar="REFERENCE",
        help="explain why the image INPUT is similar to each REFERENCE image (cosine of the "
        "model's image embeddings; one map per reference); references of any size are "
        "resized by the model's preprocessing",
    )
    explain.add_argument(
        "--strict",
        action="store_true",
        help="refuse the whole folder when one image cannot be read (default: explain the "
        "readable ones, list the others at the end and exit with code 1)",
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
    explain.add_argument(
        "--animation",
        choices=("gif", "mp4", "none"),
        default="gif",
        help="a video's animation of each map: gif (plays anywhere), mp4 (smaller; PyAV) or none",
    )
    explain.add_argument("--out", type=Path, required=True, help="output folder")
    explain.add_argument("--quiet", action="store_true", help="no progress bar or notes")
    explain.set_defaults(func=cmd_explain)

    explorer = sub.add_parser(
        "app",
        help="the interactive LeGrad explorer in the browser (Gradio, app extra)",
        description="Upload photos (or a video or sound for a video/audio classifier), pick "
        "classes or prompts, see LeGrad's maps (docs/app.md).",
        formatter_class=_Formatter,
    )
    explorer.add_argument(
        "--model",
        default="default",
        help=model_help + "; hf:FOLDER of a video or audio classifier (VideoMAE, ViViT, "
        "TimeSformer, V-JEPA 2, AST) serves a page for one video or sound; hf:FOLDER of a "
        "vision-language model (Qwen-VL, LLaVA, PaliGemma, ...) a page that asks it about "
        "an image or a video",
    )
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
        return EXIT_USAGE
    except Interrupted as stop:
        print(f"\n{stop}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return code


if __name__ == "__main__":
    sys.exit(main())
