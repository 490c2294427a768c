"""An interactive LeGrad explorer in the browser (Gradio), for captum 0.9+ and numpy 2.

    captum-legrad app --model default                 # http://127.0.0.1:7860
    captum-legrad app --model timm:vit_base_patch16_224 --weights vit.safetensors

or from Python / a Jupyter notebook::

    from captum_legrad import app
    app.launch("default")                 # a browser tab
    app.launch(model, inline=True)        # inline in a notebook cell

A person uploads images (or picks an example), gets the top-k predicted classes explained
with names and scores, or types class names / indices, or free-text prompts for an
image-text model (one map per prompt), or uploads a reference image and sees why each
image is similar to it (:class:`~captum_legrad.ImageImageSimilarity`, feature models);
chooses the layers (all, the last two, a custom set), the pooling and the opacity; sees the
per-layer maps as a gallery; compares with baselines (Chefer GAE, GradCAM, Saliency) side
by side; and downloads the maps (``.npy``) and the figure.

It binds 127.0.0.1 unless told otherwise, makes no share link, sends no analytics and loads
no fonts from the internet. On start it prints the address it serves and how to stop it.
Bad input (an unreadable file, an unknown class, an empty prompt) gets a message in the
page and one line on the console; the server keeps running. Its temporary folders (the
downloads, the examples, Gradio's uploads) are removed when it stops.

The work is done by :class:`Explorer`, plain Python that the tests call without a browser;
:func:`build` lays it out with Gradio (the ``app`` extra: ``pip install "captum-legrad[app]"``).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    ContextManager,
    Dict,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import numpy as np
import torch
from torch import Tensor, nn

from . import viz
from .attribution import LeGrad
from .discovery import discover
from .errors import UnsupportedModelError
from .eval.ask import AskExplanation, compute_ask, load_vlm, save_ask, takes_video, vlm_model
from .eval.classes import ClassNameError, parse_classes
from .eval.explain import ExplainError
from .eval.explain_media import (
    MediaExplanation,
    MediaModel,
    compute_media,
    load_media_model,
    media_model_kind,
    save_media,
)
from .eval.files import OutputFolder
from .eval.media import AUDIO_EXTENSIONS, VIDEO_EXTENSIONS, MediaError
from .eval.models import LoadedModel, ModelError, load_model
from .internals import at_input_size, minmax_normalize
from .scores.image import ImageImageSimilarity
from .spec import ViTSpec

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "Explorer",
    "ExplorerError",
    "Settings",
    "Explanation",
    "MediaExplorer",
    "MediaView",
    "AskExplorer",
    "AskView",
    "BASELINES",
    "LAYER_CHOICES",
    "build",
    "describe",
    "figure",
    "launch",
]

#: Baselines offered beside LeGrad: display name → key of ``eval.harness.METHODS``.
BASELINES: Dict[str, str] = {"Chefer GAE": "gae", "GradCAM": "gradcam", "Saliency": "saliency"}
#: The layer choices: all blocks (the paper), the last two (the reference code), a custom set.
LAYER_CHOICES = ("all", "last two", "custom")
#: Gallery images are drawn at least this many pixels on their shorter side.
DISPLAY_SIZE = 256
#: The colour map of every map on the page and in the figure.
CMAP = "jet"
#: How every map is drawn, on the page and in the figure: maps scaled to [0, 1], one colour
#: map, colour bars in the figure (the opacity is the page's slider).
STYLE = viz.FigureStyle(cmap=CMAP, vmin=0.0, vmax=1.0, colorbar=True)
#: Gradio's first port when none is given (it moves up when this one is taken).
DEFAULT_PORT = 7860

Gallery = List[Tuple[np.ndarray, str]]


class ExplorerError(ValueError):
    """Something the person asked for cannot be done; shown in the page as it is."""


@dataclass(frozen=True)
class Settings:
    """What to explain and how, as the page's controls give it.

    Attributes:
        what: Class names or indices (comma-separated), or prompts (one per line or comma)
            for image-text models; empty: the top-k predicted classes. Not used when
            reference images are given (then the maps explain the similarity to them).
        top_k: How many predicted classes to explain when ``what`` is empty.
        layers: One of :data:`LAYER_CHOICES`.
        custom_layers: Block indices for ``layers="custom"``, e.g. ``"-3, -2, -1"``.
        pooling: ``"mean"`` or ``"model"`` (see :class:`~captum_legrad.LeGrad`).
        opacity: Opacity of the maps over the images, 0..1.
        baselines: Names from :data:`BASELINES` to show beside LeGrad.
    """

    what: str = ""
    top_k: int = 1
    layers: str = "all"
    custom_layers: str = ""
    pooling: str = "mean"
    opacity: float = 0.5
    baselines: Tuple[str, ...] = ()


@dataclass
class Explanation:
    """What the page shows after **Explain**.

    Attributes:
        summary: Markdown: a table of the images, the explained targets and their scores.
        rows: The same table as ``(image, target, score)`` rows, one per map.
        maps: LeGrad overlays, one per (image, target), with captions
            ``"image: target (score)"``.
        layers: The per-layer maps of the first image and target.
        baselines: Baseline overlays, one per (image, target, baseline).
        files: The downloads: the maps (``.npy``, ``(images, targets, H, W)``) and the figure.
        figure: The downloaded figure (a matplotlib ``Figure``): per image, the image and one
            panel per target, each titled with the image's file name, the target and its
            score, with a colour bar.
        seconds: Wall time of the explanation.
    """

    summary: str
    rows: List[Tuple[str, str, str]] = field(default_factory=list)
    maps: Gallery = field(default_factory=list)
    layers: Gallery = field(default_factory=list)
    baselines: Gallery = field(default_factory=list)
    files: List[str] = field(default_factory=list)
    figure: Optional[Figure] = None
    seconds: float = 0.0


ProgressFn = Callable[[float, str], None]


def _at_size(spec: ViTSpec, x: Tensor) -> ContextManager[None]:
    """Run the model at ``x``'s size outside LeGrad (scores, Captum's Saliency)."""
    return at_input_size(spec.input_size, (int(x.shape[-2]), int(x.shape[-1])), family=spec.family)


def _display(rgb: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` in [0, 1] → uint8, upscaled (bilinear) to at least :data:`DISPLAY_SIZE`."""
    from PIL import Image

    image = (np.clip(rgb, 0.0, 1.0) * 255).round().astype(np.uint8)
    scale = max(1, -(-DISPLAY_SIZE // min(rgb.shape[:2])))
    if scale == 1:
        return image
    size = (image.shape[1] * scale, image.shape[0] * scale)
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))


def _blend(image: Tensor, heat: Tensor, opacity: float) -> np.ndarray:
    """Image ``(3, H, W)`` in [0, 1] and map ``(H, W)`` in [0, 1] → display array."""
    return _display(viz.blend(image, heat, alpha=opacity, style=STYLE))


class _Workspace:
    """Temporary folders that are removed when the explorer stops (or the process exits)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="captum-legrad-app-"))
        self._set_env = False
        # Gradio makes an (empty) folder in its default cache when it starts a server,
        # whatever GRADIO_TEMP_DIR says later: removed too when it was not there before.
        self._default_cache = Path(tempfile.gettempdir()) / "gradio"
        self._cache_existed = self._default_cache.exists()
        atexit.register(self.remove)

    def folder(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def hold_gradio_files(self) -> None:
        """Gradio's uploads and cached files go here too, unless GRADIO_TEMP_DIR is set."""
        if "GRADIO_TEMP_DIR" not in os.environ:
            os.environ["GRADIO_TEMP_DIR"] = str(self.folder("gradio"))
            self._set_env = True

    def remove(self) -> None:
        if self._set_env and os.environ.get("GRADIO_TEMP_DIR") == str(self.root / "gradio"):
            del os.environ["GRADIO_TEMP_DIR"]
        self._set_env = False
        shutil.rmtree(self.root, ignore_errors=True)
        if not self._cache_existed and self._default_cache.is_dir():
            for folder, _, _ in sorted(os.walk(self._default_cache), reverse=True):
                with contextlib.suppress(OSError):  # only empty folders go
                    os.rmdir(folder)
        atexit.unregister(self.remove)


class Explorer:
    r"""The explorer's work, without the page: preprocess, predict, explain, draw, save.

    Args:
        loaded (LoadedModel): The model with its input size, normalisation and class names
                    (:func:`captum_legrad.eval.models.load_model`).
        workdir (Path, optional): Where the downloads are written (one folder per request).
                    Default: a temporary folder, removed by :meth:`close` or at exit.
        description (str, optional): A line about the model shown on the page.

    Examples::

        >>> from captum_legrad.app import Explorer, Settings
        >>> from captum_legrad.eval.models import load_model
        >>> explorer = Explorer(load_model("default"))
        >>> result = explorer.explain(["shape.png"], Settings(top_k=2))
        >>> result.summary, len(result.maps)
    """

    def __init__(
        self,
        loaded: LoadedModel,
        workdir: Optional[Path] = None,
        description: str = "",
    ) -> None:
        self.loaded = loaded
        self._own: Optional[_Workspace] = None
        if workdir is None:
            self._own = _Workspace()
            workdir = self._own.root
        self.workdir = Path(workdir)
        self.description = description
        self.image_text = loaded.with_prompts is not None
        self._spec: Optional[ViTSpec] = None if self.image_text else discover(loaded.model)

    def close(self) -> None:
        """Remove the temporary folder this explorer made (not a ``workdir`` it was given)."""
        if self._own is not None:
            self._own.remove()

    # ------------------------------------------------------------------ inputs

    def _images(
        self, files: Sequence[Union[str, Path]], what: str = "image"
    ) -> Tuple[List[str], Tensor, Tensor]:
        """Names, the pictures as the model sees them (``[0, 1]``, resized and centre-cropped
        as its preprocessing does) and the model's inputs (its own preprocessing)."""
        from PIL import Image, UnidentifiedImageError

        if not files:
            raise ExplorerError("Upload an image first (or pick an example).")
        names, pictures, inputs = [], [], []
        for file in files:
            try:
                with Image.open(file) as handle:
                    photo = handle.convert("RGB")
            except (UnidentifiedImageError, OSError, ValueError) as error:
                raise ExplorerError(
                    f"{Path(file).name} is not an image this page can read"
                    + (" (the reference image)." if what == "reference" else ".")
                ) from error
            array = np.asarray(photo, dtype=np.float32) / 255.0
            image = torch.from_numpy(array.copy()).permute(2, 0, 1)
            names.append(Path(file).name)
            pictures.append(self.loaded.preprocessing().apply(image).clamp(0, 1))
            inputs.append(self.loaded.prepare(photo))
        return names, torch.stack(pictures), torch.stack(inputs)

    def _layers(self, settings: Settings, depth: int) -> Optional[List[int]]:
        if settings.layers == "all":
            return None
        if settings.layers == "last two":
            return [-2, -1] if depth >= 2 else None
        if settings.layers != "custom":
            raise ExplorerError(f"layers must be one of {LAYER_CHOICES}.")
        try:
            chosen = [int(part) for part in re.split(r"[,\s]+", settings.custom_layers.strip())]
        except ValueError as error:
            raise ExplorerError(
                f"Custom layers must be block indices like '-2, -1', got "
                f"{settings.custom_layers!r}."
            ) from error
        bad = [i for i in chosen if not -depth <= i < depth]
        if bad:
            raise ExplorerError(
                f"Layer {bad[0]} does not exist: the model has {depth} blocks "
                f"({-depth}..{depth - 1})."
            )
        return chosen

    def _class_targets(self, text: str, num_classes: int) -> List[int]:
        """Typed class names or indices → class indices, by the parser of
        ``captum-legrad explain --target`` (:func:`captum_legrad.eval.classes.parse_classes`:
        names, their synonyms, "did you mean")."""
        try:
            return parse_classes(text, self.loaded.classes, num_classes)
        except ClassNameError as error:
            message = str(error).replace("with --labels FILE", "with the command line's --labels")
            message = message[:1].upper() + message[1:]
            raise ExplorerError(message if message[-1:] in ".?!" else message + ".") from error

    def _label(self, index: int) -> str:
        classes = self.loaded.classes
        return classes[index] if classes and 0 <= index < len(classes) else f"class {index}"

    def _similarity(self, references: Sequence[Union[str, Path]]) -> Tuple[nn.Module, List[str]]:
        """The model's similarity with the reference images, and a label per reference."""
        names, _, inputs = self._images(references, what="reference")
        try:
            model = ImageImageSimilarity.from_images(self.loaded.model, inputs)
        except UnsupportedModelError as error:
            raise ExplorerError(
                "This model has no image embedding to compare images with (its outputs are "
                "class scores). Load a feature model to compare with an image: an image-text "
                "model (OpenCLIP, HF CLIP / SigLIP), DINOv2, or timm with num_classes=0."
            ) from error
        except ValueError as error:
            raise ExplorerError(
                f"The reference image {names[0]} cannot be used with this model: {error}"
            ) from error
        return model.eval(), [f"like {name}" for name in names]

    # ------------------------------------------------------------------ the work

    def _model_and_targets(
        self, x: Tensor, settings: Settings, references: Sequence[Union[str, Path]]
    ) -> Tuple[nn.Module, ViTSpec, Tensor, List[List[int]], List[str]]:
        """The model to explain, its spec, its scores, per-image targets and target labels."""
        if references:
            model, labels = self._similarity(references)
            spec = discover(model)
            with torch.no_grad(), _at_size(spec, x):
                scores = model(x)
            return model, spec, scores, [list(range(len(labels)))] * x.shape[0], labels
        if self.image_text:
            prompts = [p.strip() for p in re.split(r"[\n,]", settings.what) if p.strip()]
            if not prompts:
                raise ExplorerError(
                    "Type at least one prompt, e.g. 'a cat, a remote' (or upload a reference "
                    "image to compare with)."
                )
            assert self.loaded.with_prompts is not None
            model = self.loaded.with_prompts(prompts).eval()
            spec = discover(model)
            with torch.no_grad(), _at_size(spec, x):
                scores = model(x)
            targets = [list(range(len(prompts)))] * x.shape[0]
            return model, spec, scores, targets, prompts
        model = self.loaded.model
        assert self._spec is not None
        with torch.no_grad(), _at_size(self._spec, x):
            scores = model(x)
        if settings.what.strip():
            chosen = self._class_targets(settings.what, scores.shape[-1])
            if not chosen:
                raise ExplorerError("Type class names or indices, or leave the field empty.")
            targets = [chosen] * x.shape[0]
        else:
            k = max(1, min(int(settings.top_k), scores.shape[-1]))
            targets = scores.topk(k, dim=-1).indices.tolist()
        return model, self._spec, scores, targets, [self._label(i) for i in range(scores.shape[-1])]

    def _score_text(self, scores: Tensor, index: int, similarity: bool) -> str:
        if similarity:
            return f"cosine similarity {float(scores[index]):.3f}"
        if self.image_text:
            return f"cosine {float(scores[index]):.3f}"
        if self.loaded.multilabel:
            return f"p = {float(torch.sigmoid(scores[index])):.2f}"
        return f"p = {float(torch.softmax(scores, dim=-1)[index]):.2f}"

    def explain(
        self,
        files: Sequence[Union[str, Path]],
        settings: Settings,
        progress: Optional[ProgressFn] = None,
        references: Optional[Sequence[Union[str, Path]]] = None,
    ) -> Explanation:
        """Explain every image for the targets ``settings`` names; see :class:`Explanation`.

        Args:
            files: The images.
            settings: What to explain and how.
            progress: Called with the fraction done and what runs now.
            references: Reference images: then each map explains the cosine similarity of
                an image with a reference (:class:`~captum_legrad.ImageImageSimilarity`,
                for models with an image embedding) and ``settings.what`` is not used.

        Raises:
            ExplorerError: an unreadable file, an unknown class, an empty prompt, bad layers,
                a reference with a model that has no image embedding.
        """
        start = time.perf_counter()
        report = progress or (lambda fraction, text: None)
        report(0.05, "reading images")
        names, pictures, x = self._images(files)
        similarity = bool(references)
        model, spec, scores, targets, labels = self._model_and_targets(
            x, settings, references or ()
        )
        layers = self._layers(settings, spec.num_layers)
        if settings.pooling not in ("mean", "model"):
            raise ExplorerError("pooling must be 'mean' or 'model'.")
        chosen = [b for b in settings.baselines if b in BASELINES]
        unknown = [b for b in settings.baselines if b not in BASELINES]
        if unknown:
            raise ExplorerError(f"Unknown baseline {unknown[0]!r}; choose from {list(BASELINES)}.")
        legrad = LeGrad(model, layers, pooling=settings.pooling, spec=spec)
        index = torch.tensor(targets)  # (B, K)
        report(0.2, "LeGrad")
        maps = legrad.attribute_multi(x, targets=index, output="map")  # (B, K, H, W)
        result = Explanation(summary="")
        titles: List[List[str]] = []
        for b, name in enumerate(names):
            titles.append([])
            for k, target in enumerate(targets[b]):
                score = self._score_text(scores[b], target, similarity)
                caption = f"{name}: {labels[target]} ({score})"
                result.maps.append((_blend(pictures[b], maps[b, k], settings.opacity), caption))
                result.rows.append((name, labels[target], score))
                titles[b].append(f"{name}\n{labels[target]} ({score})")
        result.summary = _table(result.rows)
        report(0.5, "per-layer maps")
        first = int(targets[0][0])
        per_layer = legrad.attribute_layers(x[:1], target=first)[0]  # (L, g_h, g_w)
        upsampled = torch.nn.functional.interpolate(
            per_layer[None], size=pictures.shape[-2:], mode="bilinear", align_corners=False
        )[0]
        for layer, heat in zip(legrad.layers, minmax_normalize(upsampled)):
            caption = f"block {layer} ({names[0]}: {labels[first]})"
            result.layers.append((_blend(pictures[0], heat, settings.opacity), caption))
        if chosen:
            from .eval.harness import METHODS

            for step, baseline in enumerate(chosen):
                report(0.6 + 0.3 * step / len(chosen), baseline)
                method = METHODS[BASELINES[baseline]][1](model, spec)
                # The attention baselines resize by themselves; Captum's Saliency runs the model.
                sized = _at_size(spec, x) if baseline == "Saliency" else contextlib.nullcontext()
                for k in range(index.shape[1]):
                    with sized:
                        attr = method.attribute(x, target=index[:, k])
                    heat = minmax_normalize(attr.detach().float().mean(dim=1))
                    for b, name in enumerate(names):
                        caption = f"{baseline} — {name}: {labels[int(index[b, k])]}"
                        result.baselines.append(
                            (_blend(pictures[b], heat[b], settings.opacity), caption)
                        )
        report(0.9, "files")
        result.figure = figure(names, pictures, maps, titles, settings.opacity)
        result.files = self._save(maps, result.figure)
        result.seconds = time.perf_counter() - start
        report(1.0, "done")
        return result

    def _save(self, maps: Tensor, fig: Figure) -> List[str]:
        folder = Path(tempfile.mkdtemp(dir=self.workdir, prefix="legrad-"))
        npy = folder / "legrad_maps.npy"
        np.save(npy, maps.numpy().astype(np.float32))
        path = folder / "legrad_figure.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        return [str(npy), str(path)]


@dataclass
class MediaView:
    """What the page shows after **Explain** for a video or audio file.

    Attributes:
        summary: Markdown: a table of the file, the explained targets and their
            probabilities, and the notes (frames sampled, sound cut).
        rows: The same table as ``(file, target, probability)`` rows, one per target.
        captions: ``"file: target (p = 0.41)"``, one per target.
        figure: The frame strip (video) or the spectrogram figure (audio), a matplotlib
            ``Figure`` titled with the file's name, one row per target.
        figure_file: The figure as a PNG file.
        animations: One animated GIF per target (video; empty for audio).
        files: The downloads: the maps (``.npy``, one per target), the figure, the GIFs.
        explained: The computation behind it (maps, inputs, the media read).
        seconds: Wall time of the explanation.
    """

    summary: str
    rows: List[Tuple[str, str, str]]
    captions: List[str]
    figure: Figure
    figure_file: str
    animations: List[str]
    files: List[str]
    explained: MediaExplanation
    seconds: float = 0.0


class MediaExplorer:
    r"""The explorer's work for a Hugging Face video or audio classifier: read the file,
    run the model's own processor, explain, draw, save
    (:func:`~captum_legrad.eval.explain_media.compute_media`, the computation of
    ``captum-legrad explain`` for media).

    Args:
        loaded (MediaModel): The model and its processor
                    (:func:`~captum_legrad.eval.explain_media.load_media_model`).
        workdir (Path, optional): Where the downloads are written (one folder per request).
                    Default: a temporary folder, removed by :meth:`close` or at exit.
        description (str, optional): A line about the model shown on the page.

    Examples::

        >>> from captum_legrad.app import MediaExplorer
        >>> from captum_legrad.eval.explain_media import load_media_model
        >>> explorer = MediaExplorer(load_media_model("hf:videomae-kinetics", "video"))
        >>> view = explorer.explain("clip.mp4", top_k=2)
        >>> view.captions, view.animations
    """

    def __init__(
        self,
        loaded: MediaModel,
        workdir: Optional[Path] = None,
        description: str = "",
    ) -> None:
        self.loaded = loaded
        self.kind = loaded.kind
        self._own: Optional[_Workspace] = None
        if workdir is None:
            self._own = _Workspace()
            workdir = self._own.root
        self.workdir = Path(workdir)
        self.description = description

    def close(self) -> None:
        """Remove the temporary folder this explorer made (not a ``workdir`` it was given)."""
        if self._own is not None:
            self._own.remove()

    def _targets(self, what: str) -> Optional[List[str]]:
        if not what.strip():
            return None
        outputs = self.loaded.num_classes or len(self.loaded.classes or [])
        try:
            chosen = parse_classes(what, self.loaded.classes, outputs)
        except ClassNameError as error:
            message = str(error)
            message = message[:1].upper() + message[1:]
            raise ExplorerError(message if message[-1:] in ".?!" else message + ".") from error
        if not chosen:
            raise ExplorerError("Type class names or indices, or leave the field empty.")
        return [str(index) for index in chosen]

    def explain(
        self,
        file: Optional[Union[str, Path]],
        what: str = "",
        top_k: int = 1,
        progress: Optional[ProgressFn] = None,
    ) -> MediaView:
        """Explain one video or audio file for the classes ``what`` names (names or indices,
        as ``captum-legrad explain --target``), or its ``top_k`` predicted classes.

        Raises:
            ExplorerError: no file, a file that is not a readable video or audio file (one
                line, as the command line says it), an unknown class.
        """
        start = time.perf_counter()
        report = progress or (lambda fraction, text: None)
        if not file:
            raise ExplorerError(
                f"Upload a{'n audio' if self.kind == 'audio' else ' video'} file first."
            )
        path = Path(file)
        targets = self._targets(what)
        report(0.1, f"reading the {self.kind} and explaining")
        try:
            explained = compute_media(self.loaded, path, targets=targets, top_k=max(1, int(top_k)))
        except (MediaError, ExplainError) as error:
            # the file by its name: the page's upload folder means nothing to the person
            message = " ".join(str(error).split()).replace(str(path), path.name)
            message = message[:1].upper() + message[1:]
            raise ExplorerError(message if message[-1:] in ".?!" else message + ".") from error
        report(0.7, "files")
        folder = Path(tempfile.mkdtemp(dir=self.workdir, prefix="legrad-"))
        written = save_media(explained, OutputFolder(folder), animation="gif", fmt="png")
        result = explained.result
        rows = [
            (path.name, name, f"p = {score:.2f}")
            for name, score in zip(result.names, result.scores)
        ]
        captions = [f"{a}: {b} ({c})" for a, b, c in rows]
        notes = "".join(f"\n\n<small>{note}</small>" for note in result.notes)
        report(1.0, "done")
        return MediaView(
            summary=_table(rows).replace("| image |", f"| {self.kind} |", 1) + notes,
            rows=rows,
            captions=captions,
            figure=explained.figure,
            figure_file=str(next(p for p in written if p.suffix == ".png")),
            animations=[str(p) for p in written if p.suffix == ".gif"],
            files=[str(p) for p in written],
            explained=explained,
            seconds=time.perf_counter() - start,
        )


@dataclass
class AskView:
    """What the page shows after **Ask** for a vision-language model.

    Attributes:
        summary: Markdown: the question, the answer and a table of its tokens with their
            logits and probabilities.
        rows: The same table as ``(token, logit, probability)`` rows, one per token.
        maps: For a photo, one overlay per answer token on the photo (the original photo
            for the families described by views: tiles and views placed back, else the
            processed image), captioned ``photo.png: "cat"``, then the whole answer's map
            (``photo.png: whole answer "a cat"``). Empty for a video.
        strip: For a video, the figure ``--ask`` writes (a frame strip per token and one
            for the whole answer) as a PNG file and its caption; None for a photo.
        animations: For a video, one animated GIF per answer token and its caption.
        files: The downloads: the files ``explain --ask`` writes (the maps ``.npy`` and
            the figure).
        explained: The computation behind it (:class:`~captum_legrad.eval.ask.AskExplanation`).
        seconds: Wall time of the explanation.
    """

    summary: str
    rows: List[Tuple[str, str, str]]
    maps: Gallery
    strip: Optional[Tuple[str, str]]
    animations: List[Tuple[str, str]]
    files: List[str]
    explained: AskExplanation
    seconds: float = 0.0


def _quoted(token: str) -> str:
    """A token as a caption shows it: in double quotes, without its leading space."""
    return '"' + (token.strip() or token).replace("\n", "\\n") + '"'


class AskExplorer:
    r"""The explorer's work for a vision-language model: answer a question about an image
    (or a video) and explain every answer token (:func:`~captum_legrad.eval.ask.compute_ask`,
    the computation of ``captum-legrad explain --ask``; :func:`~captum_legrad.eval.ask.save_ask`
    writes the same files).

    Args:
        model (nn.Module): The vision-language model (:func:`~captum_legrad.eval.ask.load_vlm`).
        processor (Any): Its processor.
        workdir (Path, optional): Where the downloads are written (one folder per request).
                    Default: a temporary folder, removed by :meth:`close` or at exit.
        description (str, optional): A line about the model shown on the page.

    Examples::

        >>> from captum_legrad.app import AskExplorer
        >>> from captum_legrad.eval.ask import load_vlm
        >>> explorer = AskExplorer(*load_vlm("hf:qwen2-vl-2b"))
        >>> view = explorer.ask("photo.png", "What is this?")
        >>> view.rows, [caption for _, caption in view.maps]
    """

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        workdir: Optional[Path] = None,
        description: str = "",
    ) -> None:
        self.model = model
        self.processor = processor
        self.takes_video = takes_video(model, processor)
        self._own: Optional[_Workspace] = None
        if workdir is None:
            self._own = _Workspace()
            workdir = self._own.root
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.description = description

    def close(self) -> None:
        """Remove the temporary folder this explorer made (not a ``workdir`` it was given)."""
        if self._own is not None:
            self._own.remove()

    def ask(
        self,
        file: Optional[Union[str, Path]],
        question: str,
        answer: str = "",
        max_new_tokens: int = 32,
        opacity: float = 0.5,
        progress: Optional[ProgressFn] = None,
    ) -> AskView:
        """Answer ``question`` about the image or video ``file`` (or explain ``answer``
        when given) and explain every answer token.

        Args:
            file: An image, or a video (by its extension, :data:`VIDEO_EXTENSIONS`) for a
                model that takes videos.
            question: The question.
            answer: The answer to explain; empty: the model's own greedy answer.
            max_new_tokens: Longest generated answer.
            opacity: Opacity of the maps over the image.
            progress: Called with the fraction done and what runs now.

        Raises:
            ExplorerError: no file, an empty question, an unreadable file, a video with a
                model that answers about images only, an answer without tokens.
        """
        start = time.perf_counter()
        report = progress or (lambda fraction, text: None)
        if not file:
            raise ExplorerError(
                "Upload an image" + (" or a video" if self.takes_video else "") + " first."
            )
        if not question.strip():
            raise ExplorerError("Type a question about the image, e.g. 'What is in the picture?'")
        path = Path(file)
        video = path.suffix.lower() in VIDEO_EXTENSIONS
        report(0.1, "answering and explaining")
        try:
            explained = compute_ask(
                self.model,
                self.processor,
                path,
                question.strip(),
                video=video,
                answer=answer.strip() or None,
                max_new_tokens=max(1, int(max_new_tokens)),
                scores=True,
            )
        except (MediaError, ModelError, ValueError) as error:
            # the file by its name: the page's upload folder means nothing to the person
            message = " ".join(str(error).split()).replace(str(path), path.name)
            message = message.replace("--ask on a video", "A video")
            message = message[:1].upper() + message[1:]
            raise ExplorerError(message if message[-1:] in ".?!" else message + ".") from error
        report(0.7, "files")
        folder = Path(tempfile.mkdtemp(dir=self.workdir, prefix="legrad-"))
        written = save_ask(explained, OutputFolder(folder), animation="gif" if video else "none")
        files = [p for p in written if p.suffix != ".gif"]  # what explain --ask writes
        result = explained.result
        name = path.name
        captions = [f"{name}: {_quoted(token)}" for token in result.tokens]
        gifs = [str(p) for p in written if p.suffix == ".gif"]
        animations = list(zip(gifs, captions))
        assert explained.logits is not None and explained.probabilities is not None
        rows = [
            (token, f"{logit:.2f}", f"{p:.3f}")
            for token, logit, p in zip(result.tokens, explained.logits, explained.probabilities)
        ]
        maps: Gallery = []
        strip = None
        if video:
            strip = (str(files[1]), f"{name}: {question.strip()} → {result.text}")
        else:
            image = result.pixel_values[0]
            for heat, caption in zip(result.maps, captions):
                maps.append((self._blend(explained, image, heat, opacity), caption))
            whole = f"{name}: whole answer {_quoted(str(result.text))}"
            maps.append((self._blend(explained, image, result.answer_map, opacity), whole))
        report(1.0, "done")
        return AskView(
            summary=_answer_table(name, question.strip(), str(result.text), rows),
            rows=rows,
            maps=maps,
            strip=strip,
            animations=animations,
            files=[str(p) for p in files],
            explained=explained,
            seconds=time.perf_counter() - start,
        )

    @staticmethod
    def _blend(explained: AskExplanation, image: Tensor, heat: Tensor, opacity: float) -> Any:
        rgb = viz.blend(
            image, heat, mean=explained.mean, std=explained.std, alpha=opacity, style=STYLE
        )
        return _display(rgb)


def _answer_table(
    name: str, question: str, answer: str, rows: Sequence[Tuple[str, str, str]]
) -> str:
    """The question, the answer and its tokens as Markdown (``|`` in texts escaped)."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [
        f"**{cell(name)}**: {cell(question)} → **{cell(answer)}**",
        "",
        "| # | token | logit | probability |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {j} | {cell(_quoted(token))} | {logit} | {p} |"
        for j, (token, logit, p) in enumerate(rows, start=1)
    ]
    return "\n".join(lines)


def _table(rows: Sequence[Tuple[str, str, str]]) -> str:
    """``(image, target, score)`` rows → a Markdown table (``|`` in names escaped)."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| image | target | score |", "|---|---|---|"]
    lines += [f"| {cell(a)} | **{cell(b)}** | {cell(c)} |" for a, b, c in rows]
    return "\n".join(lines)


def figure(
    names: Sequence[str],
    pictures: Tensor,
    maps: Tensor,
    titles: Sequence[Sequence[str]],
    opacity: float = 0.5,
    panel_size: float = 2.6,
) -> Figure:
    r"""The explorer's downloadable figure: one row per image, its picture then one panel per
    target; every panel names its image, target and score, and has a colour bar.

    Args:
        names (sequence of str): The images' file names.
        pictures (Tensor): ``(B, 3, H, W)`` in ``[0, 1]``, as the model saw them.
        maps (Tensor): ``(B, K, H, W)`` LeGrad maps in ``[0, 1]``.
        titles (sequence of sequence of str): ``titles[b][k]``, the title of map ``(b, k)``.
        opacity (float, optional): Opacity of the maps. Default: 0.5
        panel_size (float, optional): Height of a panel in inches. Default: 2.6

    Returns:
        *matplotlib.figure.Figure*
    """
    from matplotlib.figure import Figure

    rows, k = int(maps.shape[0]), int(maps.shape[1])
    fig = Figure(
        figsize=(panel_size * (1 + 1.2 * k), (panel_size + 0.4) * rows), layout="constrained"
    )
    axes = fig.subplots(rows, k + 1, squeeze=False)
    for b in range(rows):
        ax = axes[b, 0]
        ax.imshow(viz.denormalize(pictures[b]))
        ax.set_title(f"{names[b]}\n(input)", fontsize=STYLE.title_size)
        ax.set_axis_off()
        for j in range(k):
            viz.overlay(
                pictures[b],
                maps[b, j],
                alpha=opacity,
                title=titles[b][j],
                ax=axes[b, j + 1],
                style=STYLE,
            )
    return fig


def _example_files(loaded: LoadedModel, folder: Path, count: int = 4) -> List[str]:
    """A few shapes images for the bundled model (its own domain)."""
    from PIL import Image

    from .data import ShapesDataset

    data = ShapesDataset(count, seed=1, image_size=loaded.image_size[0])
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        array = (data[i].image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        path = folder / f"shapes_{i}.png"
        Image.fromarray(array).save(path)
        paths.append(str(path))
    return paths


def describe(name: str, loaded: LoadedModel) -> str:
    """The page's line about a named model: what it is and where its weights came from.

    Args:
        name (str): The model as the command line's ``--model`` names it.
        loaded (LoadedModel): The model loaded by that name.

    Returns:
        Markdown, e.g. ``"Model: `timm:vit_small_patch16_224` with random weights
        (`--random-weights`): the maps show nothing the model learned."``
    """
    if name == "default":
        return (
            "Model: the bundled shapes ViT (64×64 synthetic shapes: circle, square, ...). "
            "It knows nothing of photos; use the examples or load your own model."
        )
    if loaded.random_init:
        return (
            f"Model: `{name}` with random weights (`--random-weights`): the maps show "
            "nothing the model learned."
        )
    return f"Model: `{name}`, weights: {loaded.weights or 'as loaded'}."


def _gradio() -> Any:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError as error:
        raise ImportError('The explorer needs Gradio: pip install "captum-legrad[app]".') from error
    return gradio


#: The page's style: results drawn whole (contain, at their aspect ratio), captions in full.
CSS = """
.legrad-results .fixed-height { min-height: 0 !important; max-height: none !important; }
.legrad-results .grid-wrap { overflow-y: visible !important; }
.legrad-results .thumbnail-item {
    aspect-ratio: auto !important; height: auto !important;
    display: flex !important; flex-direction: column;
}
.legrad-results .thumbnail-item > img {
    width: 100% !important; height: auto !important; object-fit: contain !important;
}
.legrad-results .caption-label {
    position: static !important; max-width: none !important; white-space: normal !important;
    overflow: visible !important; text-overflow: clip !important; border: none !important;
    border-radius: 0 !important; text-align: left;
}
.legrad-colourbar { display: flex; align-items: center; gap: 0.5em; font-size: 0.9em; }
.legrad-colourbar .bar { flex: 1; height: 14px; border-radius: 3px; }
#summary table { font-size: 0.9em; }
#summary table { width: 100%; }
#summary td, #summary th { word-break: normal; overflow-wrap: break-word; }
#message { color: var(--error-text-color, #b91c1c); }
"""


@contextlib.contextmanager
def _page(gr: Any, description: str, purpose: str) -> Iterator[Any]:
    """The explorer's page: its title, the model's description and what LeGrad shows on
    it (``purpose``); the page's own parts are built inside the ``with`` block."""
    with gr.Blocks(title="LeGrad explorer", analytics_enabled=False) as page:
        gr.Markdown(
            "## LeGrad explorer\n" + (description + "\n\n" if description else "") + purpose
        )
        yield page


def _results(gr: Any, label: str, elem_id: str, columns: int = 3, **extra: Any) -> Any:
    """A gallery of result images drawn whole (``object_fit="contain"``) at their own
    aspect ratio, styled as the explorer's results (``legrad-results``)."""
    return gr.Gallery(
        label=label,
        columns=columns,
        height="auto",
        object_fit="contain",
        fit_columns=False,
        elem_id=elem_id,
        elem_classes=["legrad-results"],
        **extra,
    )


def _colour_bar() -> str:
    """The colour bar of every map on the page, as HTML (a CSS gradient of the colour map)."""
    from matplotlib import colormaps

    stops = ", ".join(
        "rgb({}, {}, {})".format(*(round(float(c) * 255) for c in colormaps[CMAP](i / 10)[:3]))
        for i in range(11)
    )
    return (
        '<div class="legrad-colourbar" id="colourbar"><span>0 (low)</span>'
        f'<div class="bar" style="background: linear-gradient(to right, {stops});"></div>'
        "<span>1 (high)</span></div>"
        "<small>Each map is scaled to its own range: 0 is its least relevant pixel, "
        "1 its most relevant.</small>"
    )


def _previews(paths: Optional[Sequence[Any]]) -> List[Tuple[str, str]]:
    """Uploaded files → ``(path, file name)`` for the preview gallery."""
    found = []
    for item in paths or []:
        path = str(getattr(item, "name", item))
        found.append((path, Path(path).name))
    return found


def _build_ask(explorer: AskExplorer) -> Any:
    """The page for a vision-language model: one image (or video) input, the question, an
    optional answer, the token table, the overlays (or the frame strip and animations) and
    the downloads."""
    gr = _gradio()
    video = explorer.takes_video
    what = "an image or a video" if video else "an image"
    with _page(
        gr,
        explorer.description,
        "LeGrad (arXiv 2404.03214): which image regions each word of a "
        "vision-language model's answer came from.",
    ) as page:
        with gr.Row():
            with gr.Column(scale=1):
                media = gr.File(
                    label="Image or video" if video else "Image",
                    file_count="single",
                    file_types=["image", *VIDEO_EXTENSIONS] if video else ["image"],
                    type="filepath",
                    elem_id="media",
                )
                question = gr.Textbox(
                    label="Question", placeholder="What is in the picture?", elem_id="question"
                )
                answer = gr.Textbox(
                    label="Answer to explain (optional)",
                    placeholder="empty: the model's own answer",
                    elem_id="answer",
                )
                longest = gr.Slider(
                    1, 64, value=32, step=1, label="Longest answer (tokens)", elem_id="longest"
                )
                opacity = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Opacity")
                button = gr.Button("Ask", variant="primary", elem_id="explain")
                gr.Markdown(f"<small>Upload {what}, type a question and press Ask.</small>")
            with gr.Column(scale=2):
                message = gr.Markdown(elem_id="message")
                gr.HTML(_colour_bar())
                summary = gr.Markdown(elem_id="summary")
                maps = _results(gr, "One map per answer token, then the whole answer", "maps")
                strip = _results(
                    gr,
                    "Frame strip (one row per answer token, then the whole answer)",
                    "figure",
                    columns=1,
                    visible=False,
                )
                animations = _results(
                    gr, "Animated overlay (one per answer token)", "animations", visible=False
                )
                downloads = gr.File(
                    label="Downloads: maps (.npy) and figure, as explain --ask writes them",
                    file_count="multiple",
                )

        def run(
            path: Optional[str],
            question_text: str,
            answer_text: str,
            most: float,
            alpha: float,
            progress: Any = gr.Progress(),  # noqa: B008  (Gradio injects it by default)
        ) -> Tuple[Any, ...]:
            try:
                view = explorer.ask(
                    path,
                    question_text or "",
                    answer_text or "",
                    int(most),
                    float(alpha),
                    progress=lambda f, t: progress(f, desc=t),
                )
            except ExplorerError as error:
                print(f"captum-legrad app: {error}", file=sys.stderr, flush=True)
                gr.Warning(str(error))
                hidden = gr.Gallery(value=[], visible=False)
                return (f"**Could not explain:** {error}", "", [], hidden, hidden, None)
            return (
                "",
                view.summary,
                gr.Gallery(value=view.maps, visible=bool(view.maps)),
                gr.Gallery(value=[view.strip] if view.strip else [], visible=bool(view.strip)),
                gr.Gallery(value=view.animations, visible=bool(view.animations)),
                view.files,
            )

        button.click(
            run,
            inputs=[media, question, answer, longest, opacity],
            outputs=[message, summary, maps, strip, animations, downloads],
        )
    return page


def _build_media(explorer: MediaExplorer) -> Any:
    """The page for a video or audio classifier: one file input of that kind, the classes,
    the figure, the animations (video) and the downloads."""
    gr = _gradio()
    kind = explorer.kind
    extensions = list(VIDEO_EXTENSIONS if kind == "video" else AUDIO_EXTENSIONS)
    shown = "frames" if kind == "video" else "spectrogram"
    with _page(
        gr,
        explorer.description,
        f"LeGrad (arXiv 2404.03214): which parts of the {shown} the model's attention "
        "used for a class.",
    ) as page:
        with gr.Row():
            with gr.Column(scale=1):
                media = gr.File(
                    label="Video file" if kind == "video" else "Audio file",
                    file_count="single",
                    file_types=extensions,
                    type="filepath",
                    elem_id="media",
                )
                what = gr.Textbox(
                    label="Classes",
                    placeholder="names or indices, separated by , or ; "
                    "(empty: the top-k predictions)",
                    elem_id="what",
                )
                top_k = gr.Slider(1, 10, value=1, step=1, label="Top-k predicted classes")
                button = gr.Button("Explain", variant="primary", elem_id="explain")
            with gr.Column(scale=3):
                message = gr.Markdown(elem_id="message")
                gr.HTML(_colour_bar())
                summary = gr.Markdown(elem_id="summary")
                strip = _results(
                    gr, "Frame strip" if kind == "video" else "Spectrogram", "figure", columns=1
                )
                animations = _results(
                    gr, "Animated overlay (one per target)", "animations", visible=kind == "video"
                )
                downloads = gr.File(
                    label="Downloads: maps (.npy), figure"
                    + (" and animations (.gif)" if kind == "video" else ""),
                    file_count="multiple",
                )

        def run(
            path: Optional[str],
            what_text: str,
            k: float,
            progress: Any = gr.Progress(),  # noqa: B008  (Gradio injects it by default)
        ) -> Tuple[Any, ...]:
            try:
                view = explorer.explain(
                    path, what_text or "", int(k), progress=lambda f, t: progress(f, desc=t)
                )
            except ExplorerError as error:
                print(f"captum-legrad app: {error}", file=sys.stderr, flush=True)
                gr.Warning(str(error))
                return (f"**Could not explain:** {error}", "", [], [], None)
            title = "; ".join(view.captions)
            return (
                "",
                view.summary,
                [(view.figure_file, title)],
                list(zip(view.animations, view.captions)),
                view.files,
            )

        button.click(
            run,
            inputs=[media, what, top_k],
            outputs=[message, summary, strip, animations, downloads],
        )
    return page


def build(
    explorer: Union[Explorer, MediaExplorer, AskExplorer],
    examples: Optional[Sequence[str]] = None,
) -> Any:
    """The explorer's page: a ``gradio.Blocks`` around ``explorer``.

    Args:
        explorer (Explorer, MediaExplorer or AskExplorer): Does the work; a
                    :class:`MediaExplorer` (a video or audio classifier) gets a page with
                    one video or audio input, an :class:`AskExplorer` (a vision-language
                    model) the "ask" page (an image or video, a question, an optional
                    answer), an :class:`Explorer` the image inputs.
        examples (sequence of str, optional): Image files offered as examples.

    Returns:
        *gradio.Blocks*, to ``.launch(css=CSS)`` (see :func:`launch` for the safe defaults).
    """
    if isinstance(explorer, MediaExplorer):
        return _build_media(explorer)
    if isinstance(explorer, AskExplorer):
        return _build_ask(explorer)
    gr = _gradio()
    image_text = explorer.image_text
    with _page(
        gr,
        explorer.description,
        "LeGrad (arXiv 2404.03214): which image regions each layer's attention used for "
        "a class, a prompt or the similarity to a reference image.",
    ) as page:
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(
                    label="Images", file_count="multiple", file_types=["image"], type="filepath"
                )
                previews = _results(gr, "Your images", "previews", interactive=False)
                if examples:
                    gr.Examples(examples=[[[path]] for path in examples], inputs=[files])
                what = gr.Textbox(
                    label="Prompts (one per line or comma)" if image_text else "Classes",
                    placeholder=(
                        "a cat, a remote"
                        if image_text
                        else "names or indices, separated by , or ; (empty: the top-k predictions)"
                    ),
                    elem_id="what",
                )
                top_k = gr.Slider(
                    1, 10, value=1, step=1, label="Top-k predicted classes", visible=not image_text
                )
                reference = gr.File(
                    label="Compare with an image (optional)",
                    file_count="single",
                    file_types=["image"],
                    type="filepath",
                    elem_id="reference",
                    height=150,
                )
                gr.Markdown(
                    "<small>With a reference image the maps show why each image is similar to "
                    "it (cosine similarity of the model's image embeddings: CLIP, SigLIP, "
                    "DINOv2, ...); the classes or prompts are then not used.</small>"
                )
                layers = gr.Radio(list(LAYER_CHOICES), value="all", label="Layers")
                custom = gr.Textbox(label="Custom layers (block indices)", placeholder="-3, -2, -1")
                pooling = gr.Radio(["mean", "model"], value="mean", label="Pooling")
                opacity = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Opacity")
                baselines = gr.CheckboxGroup(list(BASELINES), label="Baselines beside LeGrad")
                button = gr.Button("Explain", variant="primary", elem_id="explain")
            with gr.Column(scale=2):
                message = gr.Markdown(elem_id="message")
                gr.HTML(_colour_bar())
                with gr.Row():
                    maps = _results(gr, "LeGrad", "maps", columns=2, scale=1)
                    with gr.Column(scale=1, min_width=280):
                        summary = gr.Markdown(elem_id="summary")
                per_layer = _results(
                    gr, "Per-layer maps (first image and target)", "layers", columns=4
                )
                compared = gr.Gallery(
                    label="Baselines",
                    visible=False,
                    columns=3,
                    height="auto",
                    object_fit="contain",
                    fit_columns=False,
                    elem_id="baselines",
                    elem_classes=["legrad-results"],
                )
                downloads = gr.File(
                    label="Downloads: maps (.npy) and figure", file_count="multiple"
                )

        def run(
            paths: Optional[List[str]],
            what_text: str,
            k: float,
            reference_path: Optional[str],
            layer_choice: str,
            custom_text: str,
            pooling_choice: str,
            alpha: float,
            chosen: Optional[List[str]],
            progress: Any = gr.Progress(),  # noqa: B008  (Gradio injects it by default)
        ) -> Tuple[Any, ...]:
            settings = Settings(
                what=what_text or "",
                top_k=int(k),
                layers=layer_choice,
                custom_layers=custom_text or "",
                pooling=pooling_choice,
                opacity=float(alpha),
                baselines=tuple(chosen or ()),
            )
            try:
                result = explorer.explain(
                    paths or [],
                    settings,
                    progress=lambda f, text: progress(f, desc=text),
                    references=[reference_path] if reference_path else None,
                )
            except ExplorerError as error:
                # the person's mistake: one line on the console, the message in the page
                print(f"captum-legrad app: {error}", file=sys.stderr, flush=True)
                gr.Warning(str(error))
                return (
                    f"**Could not explain:** {error}",
                    "",
                    [],
                    [],
                    gr.Gallery(value=[], visible=False),
                    None,
                )
            return (
                "",
                result.summary,
                result.maps,
                result.layers,
                gr.Gallery(value=result.baselines, visible=bool(result.baselines)),
                result.files,
            )

        files.change(_previews, inputs=[files], outputs=[previews])
        button.click(
            run,
            inputs=[files, what, top_k, reference, layers, custom, pooling, opacity, baselines],
            outputs=[message, summary, maps, per_layer, compared, downloads],
        )
    return page


def _theme(gr: Any) -> Any:
    """Gradio's default look with the system's fonts (none fetched from the internet)."""
    return gr.themes.Default(
        font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )


def _announce(url: str, asked: Optional[int], block: bool) -> None:
    """Say where the explorer is served and how to stop it (as Jupyter and TensorBoard do)."""
    from urllib.parse import urlparse

    served = urlparse(url).port
    first = int(os.environ.get("GRADIO_SERVER_PORT", DEFAULT_PORT))
    moved = f" (port {first} was taken)" if asked is None and served not in (None, first) else ""
    stop = "Press Ctrl+C to stop it." if block else "Call .close() on the page to stop it."
    print(f"LeGrad explorer running on {url}{moved}. {stop}", flush=True)


def launch(
    model: Union[str, nn.Module, LoadedModel] = "default",
    weights: Optional[Union[str, Path]] = None,
    *,
    host: str = "127.0.0.1",
    port: Optional[int] = None,
    inline: bool = False,
    examples: Optional[Sequence[str]] = None,
    image_size: Tuple[int, int] = (224, 224),
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    classes: Optional[Sequence[str]] = None,
    random_weights: bool = False,
    explain_size: Optional[Tuple[int, ...]] = None,
    block: bool = True,
) -> Any:
    r"""Start the explorer for ``model``, serve it on ``host:port`` and print its address.

    The temporary folders it makes (the downloads, the bundled model's examples, Gradio's
    uploads unless ``GRADIO_TEMP_DIR`` is set) are removed when it stops: when a blocking
    call ends (Ctrl+C raises ``KeyboardInterrupt`` after the server is closed), when
    ``page.close()`` is called, or at the latest when the process exits.

    Args:
        model (str, nn.Module or LoadedModel): ``"default"``, ``"timm:NAME"``, ... (as the
                    command line's ``--model``), a loaded model, or a ViT module (then give
                    ``image_size``, ``mean``, ``std`` and ``classes``).
                    Default: "default"
        weights (str or Path, optional): Local weights for a named model.
        host (str, optional): Interface to bind; ``"0.0.0.0"`` makes it reachable from
                    other machines, so it is never the default.
                    Default: "127.0.0.1"
        port (int, optional): Port; when None, the first free one from 7860 (the address
                    printed names the port it got).
        inline (bool, optional): Show the page inline in a Jupyter notebook.
                    Default: False
        examples (sequence of str, optional): Example images; the bundled model has its own.
        image_size, mean, std, classes: For a bare ``nn.Module``.
        explain_size (tuple, optional): Explain at this input size ``(H, W)`` (or ``(S,)``)
                    instead of the model's own, e.g. 448 on a 224 model for finer maps
                    (:meth:`~captum_legrad.eval.models.LoadedModel.at_size`).
                    Default: None
        random_weights (bool, optional): For a named model: random weights instead of the
                    pretrained ones (which are downloaded by the library when not cached).
                    Default: False
        block (bool, optional): Block until the server stops (False returns at once, e.g.
                    in tests and notebooks).
                    Default: True

    Returns:
        The running ``gradio.Blocks`` (closed already when ``block=True``).

    Raises:
        KeyboardInterrupt: Ctrl+C while blocking, after the server is closed and the
                    temporary folders are removed.

    Examples::

        >>> from captum_legrad import app
        >>> page = app.launch("default", block=False)
        LeGrad explorer running on http://127.0.0.1:7860/. Call .close() on the page to stop it.
        >>> page.close()
    """
    workspace = _Workspace()
    try:
        page = _start(
            workspace,
            model,
            weights,
            host=host,
            port=port,
            inline=inline,
            examples=examples,
            image_size=image_size,
            mean=mean,
            std=std,
            classes=classes,
            random_weights=random_weights,
            explain_size=explain_size,
        )
    except BaseException:
        workspace.remove()
        raise
    _announce(str(page.local_url), port, block)
    close = page.close

    def close_and_clean(*args: Any, **kwargs: Any) -> Any:
        try:
            return close(*args, **kwargs)
        finally:
            workspace.remove()

    page.close = close_and_clean
    if not block:
        return page
    try:
        while page.is_running:
            time.sleep(0.1)
    finally:
        page.close()
    return page


def _start(
    workspace: _Workspace,
    model: Union[str, nn.Module, LoadedModel],
    weights: Optional[Union[str, Path]],
    *,
    host: str,
    port: Optional[int],
    inline: bool,
    examples: Optional[Sequence[str]],
    image_size: Tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    classes: Optional[Sequence[str]],
    random_weights: bool,
    explain_size: Optional[Tuple[int, ...]],
) -> Any:
    """Load the model, build the page and start serving it (not blocking)."""
    description = ""
    explorer: Union[Explorer, MediaExplorer, AskExplorer]
    if isinstance(model, str) and vlm_model(model):
        if weights is not None or explain_size:
            raise ExplorerError(
                f"{model} is a vision-language model: it loads its own weights and sizes from "
                "its folder (leave out --weights and --image-size)"
            )
        try:
            vlm, processor = load_vlm(model, random_weights=random_weights)
        except ModelError as error:
            raise ExplorerError(str(error).replace("--ask", "the explorer")) from error
        ask = AskExplorer(vlm, processor, workdir=workspace.folder("work"))
        ask.description = (
            f"Model: `{model}`, a vision-language model ({type(vlm).__name__}). Upload "
            + ("an image or a video" if ask.takes_video else "an image")
            + " and ask a question; each word of the answer gets its map."
        )
        return _serve(ask, workspace, None, host=host, port=port, inline=inline)
    kind = media_model_kind(model) if isinstance(model, str) else None
    if kind is not None:
        assert isinstance(model, str)
        if weights is not None or explain_size:
            raise ExplorerError(
                f"{model} is a {kind} classifier: it loads its own weights and size from its "
                "folder (leave out --weights and --image-size)"
            )
        try:
            media_model = load_media_model(model, kind, random_weights=random_weights)
        except ModelError as error:
            raise ExplorerError(str(error)) from error
        weights_text = (
            "with random weights (`--random-weights`): the maps show nothing the model learned"
            if media_model.random_init
            else (
                "weights from its folder"
                if media_model.weights.startswith("folder")
                else f"weights: {media_model.weights}"
            )
        )
        description = (
            f"Model: `{model}`, a {kind} classifier, {weights_text}. "
            f"Upload a{'n audio' if kind == 'audio' else ' video'} file."
        )
        explorer = MediaExplorer(
            media_model, workdir=workspace.folder("work"), description=description
        )
        return _serve(explorer, workspace, None, host=host, port=port, inline=inline)
    if isinstance(model, LoadedModel):
        loaded = model
    elif isinstance(model, nn.Module):
        loaded = LoadedModel(
            model=model.eval(),
            image_size=image_size,
            mean=tuple(mean),
            std=tuple(std),
            classes=list(classes) if classes is not None else None,
        )
    else:
        try:
            loaded = load_model(
                model,
                Path(weights) if weights is not None else None,
                random_weights=random_weights,
            )
        except ModelError as error:
            raise ExplorerError(str(error)) from error
        description = describe(model, loaded)
        if model == "default" and examples is None:
            examples = _example_files(loaded, workspace.folder("examples"))
    if explain_size:
        try:
            loaded = loaded.at_size((explain_size[0], explain_size[-1]))
        except ModelError as error:
            raise ExplorerError(str(error)) from error
        description += f" Explained at {loaded.image_size[0]}×{loaded.image_size[1]}."
    explorer = Explorer(loaded, workdir=workspace.folder("work"), description=description)
    return _serve(explorer, workspace, examples, host=host, port=port, inline=inline)


def _serve(
    explorer: Union[Explorer, MediaExplorer, AskExplorer],
    workspace: _Workspace,
    examples: Optional[Sequence[str]],
    *,
    host: str,
    port: Optional[int],
    inline: bool,
) -> Any:
    """Build the page and start serving it (not blocking)."""
    gr = _gradio()
    workspace.hold_gradio_files()
    page = build(explorer, examples)
    page.queue(default_concurrency_limit=2)
    page.launch(
        server_name=host,
        server_port=port,
        share=False,
        inline=inline,
        inbrowser=False,
        prevent_thread_lock=True,
        theme=_theme(gr),
        css=CSS,
        show_error=True,
        quiet=True,
        allowed_paths=[str(explorer.workdir)]
        + ([str(Path(e).parent) for e in examples] if examples else []),
    )
    return page
