"""``captum-legrad explain``: LeGrad maps of photos, shown on the photos.

For every photo:

1. the photo is preprocessed as the model expects (:meth:`LoadedModel.prepare
   <captum_legrad.eval.models.LoadedModel.prepare>`: the library's own transform: resize,
   centre crop, normalisation);
2. the model scores it; the targets are the given classes (indices or names) or prompts,
   or else the model's ``top_k`` predicted classes;
3. :meth:`LeGrad.attribute_multi <captum_legrad.LeGrad.attribute_multi>` gives one map per
   target on the model's input (``output="map"``, min-max normalised to [0, 1]);
4. each map is projected back onto the photo at its own resolution and aspect ratio
   (:meth:`Geometry.project <captum_legrad.eval.preprocess.Geometry.project>`), ``NaN``
   where the crop cut the photo away;
5. the projected maps are saved as ``<photo>_<target>.npy`` (float32, ``(h, w)``) and drawn
   in one figure per photo, ``<photo>.<format>``: the photo, then one overlay per target,
   titled with the class name or prompt and the model's probability or similarity, with a
   colour bar; the cropped-away border is greyed and hatched.

File names never collide: photos that share a stem (``pic.jpg``, ``pic.png``) keep their
extension in the name, and targets whose names clean up to the same text get a suffix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .._core.resize import at_input_size
from .classes import ClassNameError, resolve_class
from .files import OutputFolder, unique_name
from .models import LoadedModel

__all__ = [
    "ExplainError",
    "IMAGE_EXTENSIONS",
    "PhotoResult",
    "image_files",
    "photo_names",
    "open_photo",
    "safe_name",
    "read_labels",
    "resolve_target",
    "explain_photos",
    "check_photos",
    "readable_photos",
    "model_label",
    "format_score",
    "summary_lines",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


class ExplainError(ValueError):
    """A problem with what was asked (a file, a target); reported in one line."""


@dataclass
class PhotoResult:
    """What was explained in one photo and where it was written.

    Attributes:
        photo: The photo file.
        targets: The explained class indices (or prompt indices).
        names: Their class names or prompts.
        scores: The model's probability (softmax, or sigmoid for multi-label models) or,
                    for prompts, the cosine similarity.
        files: The files written for this photo.
    """

    photo: Path
    targets: List[int]
    names: List[str]
    scores: List[float]
    files: List[Path] = field(default_factory=list)


def image_files(path: Path) -> List[Path]:
    """The image file ``path``, or the images in the folder ``path`` (sorted)."""
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ExplainError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {path}")
        return files
    raise ExplainError(f"no such image or folder: {path}")


def safe_name(text: str) -> str:
    """``text`` as a file-name part: letters, digits, ``_ . -``; at most 60 characters."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.")[:60] or "target"


def photo_names(files: Sequence[Path]) -> Dict[Path, str]:
    """A distinct base name per photo: its stem, with the extension where stems collide."""
    stems: Dict[str, int] = {}
    for path in files:
        stems[path.stem.lower()] = stems.get(path.stem.lower(), 0) + 1
    taken: set = set()
    names = {}
    for path in files:
        base = safe_name(path.stem)
        if stems[path.stem.lower()] > 1:
            base = f"{base}_{safe_name(path.suffix.lstrip('.'))}"
        names[path] = unique_name(base, taken)
    return names


def read_labels(path: Path) -> List[str]:
    """Class names from a text file, one per line (line ``i`` names class ``i``)."""
    if not path.is_file():
        raise ExplainError(f"labels file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ExplainError(f"cannot read labels file {path}: {error}") from error
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ExplainError(f"labels file {path} is empty: write one class name per line")
    return [line.strip() for line in lines]


def resolve_target(text: str, classes: Optional[Sequence[str]], outputs: int) -> int:
    """A ``--target`` entry (an index or a class name) → a class index.

    :func:`captum_legrad.eval.classes.resolve_class` (the parser the explorer uses too),
    with its error as an :class:`ExplainError`.
    """
    try:
        return resolve_class(text, classes, outputs)
    except ClassNameError as error:
        raise ExplainError(str(error)) from error


def open_photo(path: Path) -> Any:
    """The photo as an RGB PIL image; :class:`ExplainError` (one line) if it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as handle:
            return handle.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ExplainError(f"cannot read image {path}: {error}") from error


def _unreadable(path: Path) -> Optional[str]:
    """Why the photo cannot be read (its header and data checked, cheaply); None if it can."""
    from PIL import Image

    try:
        with Image.open(path) as handle:
            handle.verify()
    except Exception as error:  # PIL raises many kinds for a broken file
        return " ".join(str(error).split()) or type(error).__name__
    return None


def readable_photos(files: Sequence[Path]) -> Tuple[List[Path], List[Tuple[Path, str]]]:
    """The photos whose files can be read, and the others with the reason."""
    good: List[Path] = []
    bad: List[Tuple[Path, str]] = []
    for path in files:
        reason = _unreadable(path)
        if reason is None:
            good.append(path)
        else:
            bad.append((path, reason))
    return good, bad


def check_photos(files: Sequence[Path]) -> None:
    """Open every photo's header (cheap) so that an unreadable file stops the run first."""
    for path in files:
        reason = _unreadable(path)
        if reason is not None:
            raise ExplainError(f"cannot read image {path}: {reason}")


def model_label(spec: str, loaded: LoadedModel) -> str:
    """The model in words for a figure's title: ``SPEC`` and what its weights are when the
    figure could be taken for a real result ("random weights", "bundled synthetic-shapes
    model", "weights from FILE")."""
    if loaded.shapes_model:
        what = "bundled synthetic-shapes model"
        if loaded.weights.startswith("file "):
            what += f", weights from {Path(loaded.weights[5:]).name}"
    elif loaded.random_init:
        what = "random weights"
    elif loaded.weights.startswith("file "):
        what = f"weights from {Path(loaded.weights[5:]).name}"
    else:
        what = ""
    return f"{spec} ({what})" if what else spec


def format_score(score: float) -> str:
    """A probability or similarity as the terminal and the figure both print it."""
    return f"{score:.3f}"


def _scores(raw: Tensor, loaded: LoadedModel, prompts: bool) -> Tensor:
    if prompts:
        return raw
    if loaded.multilabel:
        return raw.sigmoid()
    return raw.softmax(dim=-1)


def _title(name: str, score: float, prompts: bool, multilabel: bool) -> str:
    what = "similarity" if prompts else ("probability (sigmoid)" if multilabel else "probability")
    return f"{name}\n{what} {format_score(score)}"


def explain_photos(
    loaded: LoadedModel,
    files: Sequence[Path],
    out: OutputFolder,
    *,
    targets: Optional[Sequence[str]] = None,
    prompts: Optional[Sequence[str]] = None,
    top_k: int = 1,
    labels: Optional[Sequence[str]] = None,
    layers: Optional[Sequence[int]] = None,
    fmt: str = "png",
    device: Optional[torch.device] = None,
    warn: Callable[[str], None] = lambda message: None,
    progress: Callable[[int], Any] = lambda n: None,
    note: Optional[Callable[[str], None]] = None,
    model_name: str = "",
    on_unreadable: Optional[Callable[[Path, str], None]] = None,
) -> List[PhotoResult]:
    r"""Explain each photo and write its maps and figure into ``out``.

    Each photo's files (its ``.npy`` maps and its figure) are written together: when the
    run stops in between (an error, Ctrl-C), the files of that photo are removed again, so
    every photo's outputs are complete or absent.

    Args:
        loaded (LoadedModel): The model (:func:`~captum_legrad.eval.models.load_model`).
        files (Sequence[Path]): The photos.
        out (OutputFolder): Where to write.
        targets (Sequence[str], optional): Class indices or names (``--target``).
                    Default: None
        prompts (Sequence[str], optional): Text prompts (image-text models, ``--prompt``).
                    Default: None
        top_k (int, optional): Without targets or prompts, explain the ``top_k`` highest
                    scoring classes of each photo (capped at the model's classes, with a
                    warning).
                    Default: 1
        labels (Sequence[str], optional): Class names replacing the model's (``--labels``).
                    Default: None
        layers (Sequence[int], optional): LeGrad's blocks.
                    Default: None (all)
        fmt (str, optional): Figure format, ``png``, ``jpg`` or ``pdf``.
                    Default: "png"
        device (torch.device, optional): Where to run.
                    Default: None (CPU)
        warn (callable, optional): Called with each warning (one line), each warning once
                    (random weights).
        progress (callable, optional): Called with 1 after each photo's files are written.
        note (callable, optional): Called with each note (one line), each note once: the
                    bundled shapes model used on other images, ``top_k`` capped.
                    Default: None (``warn``)
        model_name (str, optional): The model as the user named it, for the figure titles
                    (:func:`model_label` adds "random weights" and the like).
                    Default: "" (no model in the title)
        on_unreadable (callable, optional): Called with ``(photo, reason)`` for a photo
                    that cannot be read, which is then skipped; None: such a photo stops
                    the run (checked for all photos before any work).
                    Default: None

    Returns:
        One :class:`PhotoResult` per photo explained.

    Raises:
        ExplainError: Bad targets, prompts, labels or images; the message is one line.
    """
    from .. import viz
    from ..attribution import LeGrad

    if top_k < 1:
        raise ExplainError(f"--top-k must be at least 1, got {top_k}")
    if on_unreadable is None:
        check_photos(files)
    if prompts:
        if loaded.with_prompts is None:
            raise ExplainError(
                "this model has no text tower: use --target CLASS instead of --prompt"
            )
        repeated = sorted({p for p in prompts if list(prompts).count(p) > 1})
        if repeated:
            raise ExplainError(f"--prompt {repeated[0]!r} is given twice")
        model = loaded.with_prompts(list(prompts)).eval()
        classes: Optional[List[str]] = list(prompts)
    else:
        if loaded.with_prompts is not None:
            raise ExplainError('this is an image-text model: give --prompt "a photo of a cat" ...')
        model = loaded.model
        classes = list(labels) if labels is not None else loaded.classes
    device = device if device is not None else torch.device("cpu")
    model = model.to(device).eval()
    try:
        legrad = LeGrad(model, layers=layers)
    except (TypeError, ValueError) as error:
        raise ExplainError(" ".join(str(error).split())) from error
    said: set = set()

    def warn_once(message: str) -> None:
        if message not in said:
            said.add(message)
            warn(message)

    def note_once(message: str) -> None:
        if message not in said:
            said.add(message)
            (note or warn)(message)

    if loaded.random_init:
        warn_once("the model has random weights: its maps and scores show nothing learned")
    label = model_label(model_name, loaded) if model_name else ""
    view = loaded.preprocessing()
    names_of = photo_names(files)
    inputs = {path.resolve() for path in files}
    taken: set = set()
    fixed: Optional[List[int]] = None
    results: List[PhotoResult] = []
    for path in files:
        try:
            photo = open_photo(path)
        except ExplainError as error:
            if on_unreadable is None:
                raise
            on_unreadable(path, str(error).split(": ", 1)[-1])
            continue
        x = loaded.prepare(photo)[None].to(device)
        size = (int(x.shape[-2]), int(x.shape[-1]))  # --image-size: outside the training size
        with (
            torch.no_grad(),
            at_input_size(legrad.spec.input_size, size, family=legrad.spec.family),
        ):
            raw = model(x)[0].float().cpu()
        outputs = int(raw.shape[-1])
        if labels is not None and len(labels) != outputs:
            raise ExplainError(
                f"--labels has {len(labels)} names but the model has {outputs} outputs"
            )
        scores = _scores(raw, loaded, bool(prompts))
        if prompts:
            chosen = list(range(len(prompts)))
        elif targets:
            if fixed is None:
                fixed = [resolve_target(t, classes, outputs) for t in targets]
                doubled = sorted({t for t in fixed if fixed.count(t) > 1})
                if doubled:
                    raise ExplainError(f"--target names class {doubled[0]} more than once")
            chosen = fixed
        else:
            if top_k > outputs:
                note_once(
                    f"--top-k {top_k}: the model has only {outputs} classes, so all "
                    f"{outputs} are explained"
                )
            chosen = [int(i) for i in raw.topk(min(top_k, outputs)).indices]
        if loaded.shapes_model:
            width, height = photo.size
            trained = loaded.trained_size or loaded.image_size
            if (height, width) != loaded.image_size or not bool((raw > 0).any()):
                note_once(
                    f"--model default is a tiny model trained on synthetic "
                    f"{trained[0]}×{trained[1]} shapes ({', '.join(loaded.classes or [])}); "
                    "photos that are not such images (here: another size, or no shape "
                    "detected) get classes and maps that mean nothing: use a pretrained "
                    "model, e.g. --model timm:vit_base_patch16_224"
                )
        maps = legrad.attribute_multi(x, targets=chosen, output="map")[0]
        geometry = view.geometry(photo.size[1], photo.size[0])
        projected = geometry.project(maps.float().cpu())
        names = [
            classes[t] if classes is not None and t < len(classes) else f"class {t}" for t in chosen
        ]
        result = PhotoResult(
            photo=path,
            targets=chosen,
            names=names,
            scores=[float(scores[t]) for t in chosen],
        )
        titles = [
            _title(name, score, bool(prompts), loaded.multilabel)
            for name, score in zip(names, result.scores)
        ]
        heading = f"{path.name}: LeGrad" + (f", {label}" if label else "")
        figure = viz.plot_photo(photo, projected, titles, suptitle=heading)
        base = names_of[path]
        npy_names = [
            unique_name(f"{base}_{safe_name(name.split(',')[0] if not prompts else name)}", taken)
            + ".npy"
            for name in names
        ]
        figure_name = unique_name(base, taken) + f".{fmt}"
        while (out.path / figure_name).resolve() in inputs:  # never overwrite a photo
            figure_name = unique_name(f"{base}_legrad", taken) + f".{fmt}"
        try:  # all of this photo's files, or none
            for k, file_name in enumerate(npy_names):
                result.files.append(out.save_npy(file_name, projected[k].numpy().astype("float32")))
            result.files.append(out.save_figure(figure_name, figure, fmt))
        except BaseException:
            for written in result.files:
                written.unlink(missing_ok=True)
                if written in out.written:
                    out.written.remove(written)
            raise
        results.append(result)
        progress(1)
    return results


def summary_lines(results: Sequence[PhotoResult], out: Path) -> List[str]:
    """One line per photo: what was explained, with its score, and the files written."""
    lines = []
    for result in results:
        what = "; ".join(
            f"{name.split(',')[0]} ({format_score(score)})"
            for name, score in zip(result.names, result.scores)
        )
        files = ", ".join(p.name for p in result.files)
        lines.append(f"{result.photo.name}: {what} → {files}")
    count = sum(len(r.files) for r in results)
    lines.append(f"wrote {count} files to {out}")
    return lines
