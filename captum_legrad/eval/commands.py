"""The ``eval`` and ``demo`` commands: which data, which model, which files, which text.

:mod:`captum_legrad.cli` parses the command line into an :class:`EvalRequest` (or the
demo's few options) and calls :func:`run_eval` / :func:`run_demo`; these pick the data set
(:mod:`~captum_legrad.eval.batches`), run the evaluation
(:func:`~captum_legrad.eval.runner.run_evaluation`), write the report and figures
(:mod:`~captum_legrad.eval.report`) and return what the command prints, as a
:class:`CommandReport`.

A run writes all of its files or none: when it fails or is interrupted (Ctrl-C), the
files it wrote are removed again, and so are the folders it created.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch

from .batches import DataError
from .files import OutputFolder
from .harness import METHOD_NAMES, EvalConfig
from .models import LoadedModel, load_model

__all__ = ["EvalRequest", "CommandReport", "load_for_command", "run_eval", "run_demo"]

#: The shapes data set's default size for ``eval`` (the demo uses fewer).
SHAPES_DEFAULT_IMAGES = 1000


@dataclass(frozen=True)
class EvalRequest:
    """What ``captum-legrad eval`` was asked for (one field per option).

    Attributes:
        dataset: ``"shapes"``, ``"imagenet-seg"`` or ``"openimages"``.
        out: The output folder.
        model, weights, num_classes, random_weights: The model (:func:`load_model`).
        image_size: Explain at this ``(H, W)`` instead of the model's own.
        data: ``gtsegs_ijcv.mat`` or the OpenImages point-label CSV.
        images: OpenImages: the folder of ``<ImageId>.jpg``.
        class_descriptions: OpenImages: the ``LabelName,DisplayName`` CSV.
        methods: Method keys (:data:`~captum_legrad.eval.harness.METHOD_NAMES`).
        num_images: Images to evaluate (shapes: 1000; others: all).
        batch_size: Images per batch.
        seed: The shapes data set's seed (1: the test split).
        threshold: Binarisation threshold, or ``"mean"``.
        pointing_tolerance: Pointing-game tolerance in pixels (None: 15 at 224, scaled).
        perturbation: Run the perturbation tests.
        plots: Write ``curves.png`` and ``examples.png``.
        quiet: No progress bar.
    """

    dataset: str
    out: Path
    model: str = "default"
    weights: Optional[Path] = None
    num_classes: Optional[int] = None
    random_weights: bool = False
    image_size: Optional[Tuple[int, int]] = None
    data: Optional[Path] = None
    images: Optional[Path] = None
    class_descriptions: Optional[Path] = None
    methods: Sequence[str] = METHOD_NAMES
    num_images: Optional[int] = None
    batch_size: int = 50
    seed: int = 1
    threshold: Union[float, str] = 0.5
    pointing_tolerance: Optional[int] = None
    perturbation: bool = True
    plots: bool = True
    quiet: bool = False


@dataclass
class CommandReport:
    """What a command prints and what it wrote.

    Attributes:
        lines: The description lines (also written at the top of ``results.md``).
        table: The Markdown metric table.
        files: The files written, in order.
        out: The output folder.
        seconds: Wall time of the run.
    """

    lines: List[str]
    table: str
    out: Path
    files: List[Path] = field(default_factory=list)
    seconds: float = 0.0

    def text(self) -> str:
        """The command's standard output."""
        written = "\n".join(f"  {path.name}" for path in self.files)
        return (
            "\n".join(self.lines)
            + f"\n\n{self.table}\n\nwrote {len(self.files)} files to {self.out}:\n{written}"
            + f"\n({self.seconds:.1f} s)"
        )


def load_for_command(
    spec: str,
    weights: Optional[Path] = None,
    num_classes: Optional[int] = None,
    random_weights: bool = False,
    image_size: Optional[Tuple[int, int]] = None,
    announce: Optional[Callable[[str], None]] = None,
) -> LoadedModel:
    """:func:`load_model` (``announce``: where "loading pretrained weights ..." goes), then
    :meth:`LoadedModel.at_size` when ``image_size`` is given."""
    loaded = load_model(
        spec, weights, num_classes, random_weights=random_weights, announce=announce
    )
    if image_size:
        loaded = loaded.at_size((int(image_size[0]), int(image_size[-1])))
    return loaded


def _stderr(message: str) -> None:
    import sys

    print(message, file=sys.stderr, flush=True)


def check_request(request: EvalRequest) -> None:
    """Refuse what can be known wrong before any work (one-line :class:`DataError`)."""
    unknown = [m for m in request.methods if m not in METHOD_NAMES]
    if unknown:
        raise DataError(
            f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHOD_NAMES)}"
        )
    if request.dataset == "imagenet-seg" and request.data is None:
        raise DataError("--dataset imagenet-seg needs --data gtsegs_ijcv.mat")
    if request.dataset == "openimages" and request.data is None:
        raise DataError("--dataset openimages needs --data POINT_LABELS.csv")
    if request.dataset not in ("shapes", "imagenet-seg", "openimages"):
        raise DataError(
            f"unknown data set {request.dataset!r}: use shapes, imagenet-seg or openimages"
        )


def _config(
    loaded: LoadedModel,
    threshold: Union[float, str],
    perturbation: bool,
    points: int,
    tolerance: Optional[int],
) -> EvalConfig:
    return EvalConfig(
        patch_size=loaded.patch_size,
        multilabel=loaded.multilabel,
        perturbation=perturbation,
        threshold=threshold,
        num_point_classes=points,
        pointing_tolerance=tolerance,
    )


def _remove_written(out: OutputFolder, files: Sequence[Path]) -> None:
    """All or nothing: remove the files this run wrote, then the folders it created."""
    for path in files:
        path.unlink(missing_ok=True)
    out.cleanup()


def run_eval(request: EvalRequest, device: torch.device) -> Optional[CommandReport]:
    """``captum-legrad eval``: the metric table of LeGrad and the baselines on a data set.

    Runs unchanged under ``torchrun`` (each process evaluates its shard; the main process
    writes the report).

    Args:
        request (EvalRequest): What was asked.
        device (torch.device): Where to run (``--device``, already checked).

    Returns:
        The :class:`CommandReport` on the main process; None on the others.

    Raises:
        DataError, ModelError, OutputError: What was asked cannot be done (one line);
                    nothing is left behind.
        KeyboardInterrupt: Ctrl-C; nothing is left behind.
    """
    from . import distributed
    from .batches import (
        PROMPT_TEMPLATE,
        imagenet_seg_batches,
        openimages_batches,
        shapes_batches,
    )
    from .report import save_curves, save_examples, write_report
    from .runner import run_evaluation

    check_request(request)
    out = OutputFolder(request.out)
    files: List[Path] = []
    context = distributed.init(str(device))
    try:
        torch.manual_seed(0)
        loaded = load_for_command(
            request.model,
            request.weights,
            request.num_classes,
            request.random_weights,
            request.image_size,
            announce=None if request.quiet or not context.is_main else _stderr,
        )
        loaded.model.to(context.device)
        model = loaded.model
        classes: Any = loaded.classes
        perturbation = request.perturbation
        points = 0
        if request.dataset == "shapes":
            count = request.num_images or SHAPES_DEFAULT_IMAGES
            factories, classes = shapes_batches(
                loaded, count, request.batch_size, request.seed, context.device
            )
            description = f"shapes test split (seed {request.seed})"
        elif request.dataset == "imagenet-seg":
            assert request.data is not None
            factories = imagenet_seg_batches(
                loaded, request.data, request.num_images, request.batch_size, context.device
            )
            description = (
                f"ImageNet-segmentation ({request.data.name}), explaining the predicted class"
            )
        else:
            assert request.data is not None
            factories, model, points = openimages_batches(
                loaded,
                request.data,
                request.images,
                request.class_descriptions,
                request.num_images,
                request.batch_size,
                context.device,
            )
            perturbation = False
            classes = None
            description = (
                f"OpenImagesV7 point labels ({request.data.name}), prompt '{PROMPT_TEMPLATE}'"
            )
        config = _config(
            loaded, request.threshold, perturbation, points, request.pointing_tolerance
        )
        start = time.perf_counter()
        outcome = run_evaluation(
            model,
            factories,
            list(request.methods),
            config,
            context,
            show_progress=not request.quiet,
            examples=6 if context.is_main and request.plots else 0,
        )
        seconds = time.perf_counter() - start
        if not context.is_main:
            return None
        results = outcome.results(config)
        accuracy = outcome.accuracy
        kind = "every label right (exact set of present shapes)" if loaded.multilabel else "top-1"
        lines = [
            f"Dataset: {description}; {outcome.images} images, "
            f"{int(next(iter(results.values()))['pairs'])} (image, target) pairs.",
            f"Model: `{request.model}` ({loaded.weights or 'weights as loaded'})"
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
        files += [request.out / "results.md", request.out / "results.csv"]
        table = write_report(request.out, "captum-legrad eval", lines, results)
        if request.plots:
            path = request.out / "curves.png"
            files.append(path)
            if not save_curves(path, outcome, title=f"{description}, {outcome.images} images"):
                files.pop()
            path = request.out / "examples.png"
            files.append(path)
            if not save_examples(path, loaded, outcome, classes=classes):
                files.pop()
        return CommandReport(lines, table, request.out, files, seconds)
    except BaseException:
        _remove_written(out, files)
        raise
    finally:
        distributed.finish()


def run_demo(
    out_path: Path, num_images: int, examples: int, seed: int, quiet: bool
) -> CommandReport:
    """``captum-legrad demo``: the bundled model, LeGrad beside the seven baselines.

    Args:
        out_path (Path): The output folder.
        num_images (int): Held-out shapes images in the table.
        examples (int): Rows of ``demo.png`` (0: no figure).
        seed (int): The shapes data set's seed (1: the test split).
        quiet (bool): No progress bar or notes.

    Returns:
        The :class:`CommandReport`.

    Raises:
        OutputError: ``out_path`` cannot be written.
        KeyboardInterrupt: Ctrl-C; nothing is left behind.
    """
    import sys

    from .batches import shapes_batches
    from .distributed import Context
    from .report import save_curves, save_examples, write_report
    from .runner import run_evaluation

    start = time.perf_counter()
    out = OutputFolder(out_path)
    files: List[Path] = []
    try:
        torch.manual_seed(0)
        loaded = load_model("default")
        config = _config(loaded, 0.5, True, 0, None)
        # small batches: the progress bar moves while the methods run
        factories, classes = shapes_batches(loaded, num_images, 4, seed, torch.device("cpu"))
        context = Context(rank=0, world=1, device=torch.device("cpu"))
        if not quiet:
            print(
                f"demo: LeGrad and {len(METHOD_NAMES) - 1} baselines on {num_images} "
                "held-out shapes images (bundled 64×64 model, CPU)",
                file=sys.stderr,
            )
        outcome = run_evaluation(
            loaded.model,
            factories,
            list(METHOD_NAMES),
            config,
            context,
            show_progress=not quiet,
            examples=examples,
            description="demo: explaining and perturbing, batches of 4 images",
        )
        lines = [
            f"Bundled shapes ViT on {outcome.images} held-out images; classification accuracy "
            f"{outcome.accuracy:.1f} % (every label right, on these {outcome.images} images; "
            "93.9 % on the 1000 of the full table).",
        ]
        files += [out_path / "results.md", out_path / "results.csv"]
        table = write_report(out_path, "captum-legrad demo", lines, outcome.results(config))
        files.append(out_path / "curves.png")
        title = f"demo: bundled shapes model, {outcome.images} held-out images"
        if not save_curves(files[-1], outcome, title=title):
            files.pop()
        files.append(out_path / "demo.png")
        if not examples or not save_examples(
            files[-1],
            loaded,
            outcome,
            methods=("legrad", "gae", "gradcam"),
            classes=classes,
            title="LeGrad beside Chefer GAE and GradCAM",
        ):
            files.pop()
    except BaseException:
        _remove_written(out, files)
        raise
    return CommandReport(lines, table, out_path, files, time.perf_counter() - start)
