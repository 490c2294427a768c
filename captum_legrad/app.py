"""An interactive LeGrad explorer in the browser (Gradio), for captum 0.9+ and numpy 2.

    captum-legrad app --model default                 # http://127.0.0.1:7860
    captum-legrad app --model timm:vit_base_patch16_224 --weights vit.safetensors

or from Python / a Jupyter notebook::

    from captum_legrad import app
    app.launch("default")                 # a browser tab
    app.launch(model, inline=True)        # inline in a notebook cell

A person uploads images (or picks an example), gets the top-k predicted classes explained
with names and scores, or types class names / indices, or free-text prompts for an
image-text model (one map per prompt); chooses the layers (all, the last two, a custom set),
the pooling and the opacity; sees the per-layer maps as a gallery; compares with baselines
(Chefer GAE, GradCAM, Saliency) side by side; and downloads the maps (``.npy``) and the figure.

It binds 127.0.0.1 unless told otherwise, makes no share link, sends no analytics and loads
no fonts from the internet. Bad input (an unreadable file, an unknown class, an empty prompt)
gets a message in the page; the server keeps running.

The work is done by :class:`Explorer`, plain Python that the tests call without a browser;
:func:`build` lays it out with Gradio (the ``app`` extra: ``pip install "captum-legrad[app]"``).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from .attribution import LeGrad
from .discovery import discover
from .eval.models import LoadedModel, ModelError, load_model
from .spec import ViTSpec

__all__ = [
    "Explorer",
    "ExplorerError",
    "Settings",
    "Explanation",
    "BASELINES",
    "LAYER_CHOICES",
    "build",
    "launch",
]

#: Baselines offered beside LeGrad: display name → key of ``eval.harness.METHODS``.
BASELINES: Dict[str, str] = {"Chefer GAE": "gae", "GradCAM": "gradcam", "Saliency": "saliency"}
#: The layer choices: all blocks (the paper), the last two (the reference code), a custom set.
LAYER_CHOICES = ("all", "last two", "custom")
#: Gallery thumbnails are drawn at least this many pixels on their shorter side.
DISPLAY_SIZE = 256

Gallery = List[Tuple[np.ndarray, str]]


class ExplorerError(ValueError):
    """Something the person asked for cannot be done; shown in the page as it is."""


@dataclass(frozen=True)
class Settings:
    """What to explain and how, as the page's controls give it.

    Attributes:
        what: Class names or indices (comma-separated), or prompts (one per line or comma)
            for image-text models; empty: the top-k predicted classes.
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
        summary: Markdown: per image, the explained classes or prompts with their scores.
        maps: LeGrad overlays, one per (image, target), with captions.
        layers: The per-layer maps of the first image and target.
        baselines: Baseline overlays, one per (image, target, baseline).
        files: The downloads: the maps (``.npy``, ``(images, targets, H, W)``) and the figure.
        seconds: Wall time of the explanation.
    """

    summary: str
    maps: Gallery = field(default_factory=list)
    layers: Gallery = field(default_factory=list)
    baselines: Gallery = field(default_factory=list)
    files: List[str] = field(default_factory=list)
    seconds: float = 0.0


ProgressFn = Callable[[float, str], None]


def _at_size(spec: ViTSpec, x: Tensor) -> ContextManager[None]:
    """Run the model at ``x``'s size outside LeGrad (scores, Captum's Saliency)."""
    from ._core.resize import at_input_size

    return at_input_size(spec.input_size, (int(x.shape[-2]), int(x.shape[-1])), family=spec.family)


def _colour(heat: np.ndarray) -> np.ndarray:
    """``(H, W)`` in [0, 1] → ``(H, W, 3)`` jet colours in [0, 1] (matplotlib, no pyplot)."""
    from matplotlib import colormaps

    return np.asarray(colormaps["jet"](np.clip(heat, 0.0, 1.0))[..., :3], dtype=np.float32)


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
    rgb = image.permute(1, 2, 0).numpy()
    return _display((1 - opacity) * rgb + opacity * _colour(heat.numpy()))


def _normalise(maps: Tensor) -> Tensor:
    flat = maps.flatten(-2)
    low = flat.min(-1, keepdim=True).values
    span = flat.max(-1, keepdim=True).values - low
    out = torch.where(span > 0, (flat - low) / torch.where(span > 0, span, 1.0), 0.0)
    return out.view_as(maps)


class Explorer:
    r"""The explorer's work, without the page: preprocess, predict, explain, draw, save.

    Args:
        loaded (LoadedModel): The model with its input size, normalisation and class names
                    (:func:`captum_legrad.eval.models.load_model`).
        workdir (Path, optional): Where the downloads are written (one folder per request).
                    Default: a temporary folder.
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
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp())
        self.description = description
        self.image_text = loaded.with_prompts is not None
        self._spec: Optional[ViTSpec] = None if self.image_text else discover(loaded.model)

    # ------------------------------------------------------------------ inputs

    def _images(self, files: Sequence[Union[str, Path]]) -> Tuple[List[str], Tensor, Tensor]:
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
                    f"{Path(file).name} is not an image this page can read."
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
        classes = self.loaded.classes or []
        lookup = {name.lower(): i for i, name in enumerate(classes)}
        targets = []
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            if re.fullmatch(r"-?\d+", part):
                index = int(part)
                if not 0 <= index < num_classes:
                    raise ExplorerError(
                        f"Class {index} does not exist: the model has {num_classes} classes "
                        f"(0..{num_classes - 1})."
                    )
            elif part.lower() in lookup:
                index = lookup[part.lower()]
            else:
                known = ", ".join(classes[:12]) + (", ..." if len(classes) > 12 else "")
                hint = f" Known classes: {known}." if classes else " Use a class index."
                raise ExplorerError(f"Unknown class name {part!r}.{hint}")
            targets.append(index)
        return list(dict.fromkeys(targets))

    def _label(self, index: int) -> str:
        classes = self.loaded.classes
        return classes[index] if classes and 0 <= index < len(classes) else f"class {index}"

    # ------------------------------------------------------------------ the work

    def _model_and_targets(
        self, x: Tensor, settings: Settings
    ) -> Tuple[nn.Module, ViTSpec, Tensor, List[List[int]], List[str]]:
        """The model to explain, its spec, its scores, per-image targets and target labels."""
        if self.image_text:
            prompts = [p.strip() for p in re.split(r"[\n,]", settings.what) if p.strip()]
            if not prompts:
                raise ExplorerError("Type at least one prompt, e.g. 'a cat, a remote'.")
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

    def _score_text(self, scores: Tensor, index: int) -> str:
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
    ) -> Explanation:
        """Explain every image for the targets ``settings`` names; see :class:`Explanation`.

        Raises:
            ExplorerError: an unreadable file, an unknown class, an empty prompt, bad layers.
        """
        start = time.perf_counter()
        report = progress or (lambda fraction, text: None)
        report(0.05, "reading images")
        names, pictures, x = self._images(files)
        model, spec, scores, targets, labels = self._model_and_targets(x, settings)
        layers = self._layers(settings, spec.num_layers)
        if settings.pooling not in ("mean", "model"):
            raise ExplorerError("pooling must be 'mean' or 'model'.")
        legrad = LeGrad(model, layers, pooling=settings.pooling, spec=spec)
        index = torch.tensor(targets)  # (B, K)
        report(0.2, "LeGrad")
        maps = legrad.attribute_multi(x, targets=index, output="map")  # (B, K, H, W)
        result = Explanation(summary="")
        lines: List[str] = []
        for b, name in enumerate(names):
            parts = []
            for k, target in enumerate(targets[b]):
                caption = f"{name}: {labels[target]} ({self._score_text(scores[b], target)})"
                result.maps.append((_blend(pictures[b], maps[b, k], settings.opacity), caption))
                parts.append(f"**{labels[target]}** ({self._score_text(scores[b], target)})")
            lines.append(f"- {name}: " + ", ".join(parts))
        result.summary = "\n".join(lines)
        report(0.5, "per-layer maps")
        first = int(targets[0][0])
        per_layer = legrad.attribute_layers(x[:1], target=first)[0]  # (L, g_h, g_w)
        upsampled = torch.nn.functional.interpolate(
            per_layer[None], size=pictures.shape[-2:], mode="bilinear", align_corners=False
        )[0]
        for layer, heat in zip(legrad.layers, _normalise(upsampled)):
            caption = f"block {layer} ({names[0]}: {labels[first]})"
            result.layers.append((_blend(pictures[0], heat, settings.opacity), caption))
        chosen = [b for b in settings.baselines if b in BASELINES]
        unknown = [b for b in settings.baselines if b not in BASELINES]
        if unknown:
            raise ExplorerError(f"Unknown baseline {unknown[0]!r}; choose from {list(BASELINES)}.")
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
                    heat = _normalise(attr.detach().float().mean(dim=1))
                    for b, name in enumerate(names):
                        caption = f"{baseline} — {name}: {labels[int(index[b, k])]}"
                        result.baselines.append(
                            (_blend(pictures[b], heat[b], settings.opacity), caption)
                        )
        report(0.9, "files")
        result.files = self._save(names, pictures, maps, targets, labels)
        result.seconds = time.perf_counter() - start
        report(1.0, "done")
        return result

    def _save(
        self,
        names: List[str],
        pictures: Tensor,
        maps: Tensor,
        targets: List[List[int]],
        labels: List[str],
    ) -> List[str]:
        from . import viz

        folder = Path(tempfile.mkdtemp(dir=self.workdir, prefix="legrad-"))
        npy = folder / "legrad_maps.npy"
        np.save(npy, maps.numpy().astype(np.float32))
        figure = folder / "legrad_figure.png"
        columns = [labels[t] for t in targets[0]]
        fig = viz.plot_targets(pictures, maps, columns)
        fig.savefig(figure, dpi=100, bbox_inches="tight")
        return [str(npy), str(figure)]


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


def _gradio() -> Any:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError as error:
        raise ImportError('The explorer needs Gradio: pip install "captum-legrad[app]".') from error
    return gradio


def build(explorer: Explorer, examples: Optional[Sequence[str]] = None) -> Any:
    """The explorer's page: a ``gradio.Blocks`` around ``explorer``.

    Args:
        explorer (Explorer): Does the work.
        examples (sequence of str, optional): Image files offered as examples.

    Returns:
        *gradio.Blocks*, to ``.launch()`` (see :func:`launch` for the safe defaults).
    """
    gr = _gradio()
    image_text = explorer.image_text
    with gr.Blocks(title="LeGrad explorer", analytics_enabled=False) as page:
        gr.Markdown(
            "## LeGrad explorer\n"
            + (explorer.description + "\n\n" if explorer.description else "")
            + "LeGrad (arXiv 2404.03214): which image regions each layer's attention used for "
            "a class or prompt."
        )
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(
                    label="Images", file_count="multiple", file_types=["image"], type="filepath"
                )
                if examples:
                    gr.Examples(examples=[[[path]] for path in examples], inputs=[files])
                what = gr.Textbox(
                    label="Prompts (one per line or comma)" if image_text else "Classes",
                    placeholder=(
                        "a cat, a remote"
                        if image_text
                        else "names or indices, comma-separated; empty: the top-k predictions"
                    ),
                    elem_id="what",
                )
                top_k = gr.Slider(
                    1, 10, value=1, step=1, label="Top-k predicted classes", visible=not image_text
                )
                layers = gr.Radio(list(LAYER_CHOICES), value="all", label="Layers")
                custom = gr.Textbox(label="Custom layers (block indices)", placeholder="-3, -2, -1")
                pooling = gr.Radio(["mean", "model"], value="mean", label="Pooling")
                opacity = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Opacity")
                baselines = gr.CheckboxGroup(list(BASELINES), label="Baselines beside LeGrad")
                button = gr.Button("Explain", variant="primary", elem_id="explain")
            with gr.Column(scale=2):
                summary = gr.Markdown(elem_id="summary")
                maps = gr.Gallery(label="LeGrad", columns=3, elem_id="maps")
                per_layer = gr.Gallery(label="Per-layer maps (first image and target)", columns=6)
                compared = gr.Gallery(label="Baselines", columns=3)
                downloads = gr.File(
                    label="Downloads: maps (.npy) and figure", file_count="multiple"
                )

        def run(
            paths: Optional[List[str]],
            what_text: str,
            k: float,
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
                    paths or [], settings, progress=lambda f, text: progress(f, desc=text)
                )
            except ExplorerError as error:
                raise gr.Error(str(error)) from error
            return result.summary, result.maps, result.layers, result.baselines, result.files

        button.click(
            run,
            inputs=[files, what, top_k, layers, custom, pooling, opacity, baselines],
            outputs=[summary, maps, per_layer, compared, downloads],
        )
    return page


def _theme(gr: Any) -> Any:
    """Gradio's default look with the system's fonts (none fetched from the internet)."""
    return gr.themes.Default(
        font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )


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
    r"""Start the explorer for ``model`` and serve it on ``host:port``.

    Args:
        model (str, nn.Module or LoadedModel): ``"default"``, ``"timm:NAME"``, ... (as the
                    command line's ``--model``), a loaded model, or a ViT module (then give
                    ``image_size``, ``mean``, ``std`` and ``classes``).
                    Default: "default"
        weights (str or Path, optional): Local weights for a named model.
        host (str, optional): Interface to bind; ``"0.0.0.0"`` makes it reachable from
                    other machines, so it is never the default.
                    Default: "127.0.0.1"
        port (int, optional): Port; Gradio picks a free one from 7860 when None.
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
        The running ``gradio.Blocks``.

    Examples::

        >>> from captum_legrad import app
        >>> page = app.launch("default", block=False)  # http://127.0.0.1:7860
        >>> page.close()
    """
    description = ""
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
        if model == "default":
            description = (
                "Model: the bundled shapes ViT (64×64 synthetic shapes: circle, square, ...). "
                "It knows nothing of photos; use the examples or load your own model."
            )
            if examples is None:
                examples = _example_files(loaded, Path(tempfile.mkdtemp()) / "examples")
        else:
            description = f"Model: `{model}` ({loaded.weights or 'weights as loaded'})."
            if loaded.random_init:
                description += " Random weights: the maps show nothing the model learned."
    if explain_size:
        try:
            loaded = loaded.at_size((explain_size[0], explain_size[-1]))
        except ModelError as error:
            raise ExplorerError(str(error)) from error
        description += f" Explained at {loaded.image_size[0]}×{loaded.image_size[1]}."
    explorer = Explorer(loaded, description=description)
    page = build(explorer, examples)
    gr = _gradio()
    page.queue(default_concurrency_limit=2)
    page.launch(
        server_name=host,
        server_port=port,
        share=False,
        inline=inline,
        inbrowser=False,
        prevent_thread_lock=not block,
        theme=_theme(gr),
        show_error=True,
        quiet=True,
        allowed_paths=[str(explorer.workdir)]
        + ([str(Path(e).parent) for e in examples] if examples else []),
    )
    return page
