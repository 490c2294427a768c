"""``captum-legrad explain QUERY --like REF [REF ...]``: why a photo is similar to others.

The query and every reference are preprocessed as the model expects
(:meth:`LoadedModel.prepare <captum_legrad.eval.models.LoadedModel.prepare>`: resize,
centre crop), so references of any size are resized by the model's own preprocessing. The
references are embedded by the model itself
(:meth:`ImageImageSimilarity.from_images <captum_legrad.ImageImageSimilarity.from_images>`)
and LeGrad explains the cosine similarity of the query with each reference, ``target=k``
for reference ``k``. One map per reference is projected back onto the query photo and
saved as ``<query>_like_<reference>.npy``; one figure, ``<query>_like.<format>``, shows the
query, then one overlay per reference titled with the reference and the similarity.

The model must have an image embedding: a feature model (timm, OpenCLIP, an HF base or
image-text model) as it is; a timm or HF classifier through its backbone (the command's own
copy of a timm model gets ``reset_classifier(0)``; an HF classifier's ``base_model``). Other
models (torchvision's classifiers) are refused in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence

import torch
from torch import nn

from .._core.resize import at_input_size
from .explain import (
    ExplainError,
    PhotoResult,
    format_score,
    model_label,
    open_photo,
    photo_names,
    safe_name,
)
from .files import OutputFolder, unique_name
from .models import LoadedModel

__all__ = ["feature_model", "explain_like", "like_lines"]


def feature_model(loaded: LoadedModel, spec: str = "this model") -> nn.Module:
    """The module whose output is ``loaded``'s image embedding.

    A timm classifier loaded by the command line gets ``reset_classifier(0)`` (the command's
    own model, never a user's); an HF classifier gives its ``base_model``; a model that
    already returns an embedding is returned as it is.

    Raises:
        ExplainError: The model has no image embedding LeGrad can read (one line).
    """
    from ..discovery import discover
    from ..errors import UnsupportedModelError

    model: Any = loaded.model
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module) and hasattr(inner, "base_model") and inner is not model:
        if "ForImageClassification" in type(inner).__name__:  # an HF classifier's logits
            model = inner.base_model
    try:
        spec_ = discover(model)
    except UnsupportedModelError as error:
        raise ExplainError(
            f"--like: {spec} has no image embedding LeGrad can read: {error}"
        ) from error
    if not spec_.scores_are_features and callable(getattr(model, "reset_classifier", None)):
        model.reset_classifier(0)  # timm: the pooled feature instead of the class scores
        spec_ = discover(model)
    if not spec_.scores_are_features:
        raise ExplainError(
            f"--like needs a model with an image embedding, but {spec} ({type(model).__name__})"
            " returns class scores only: use a timm:, hf: or open_clip: model"
        )
    return model


def explain_like(
    loaded: LoadedModel,
    query: Path,
    references: Sequence[Path],
    out: OutputFolder,
    *,
    model_name: str = "",
    layers: Optional[Sequence[int]] = None,
    fmt: str = "png",
    device: Optional[torch.device] = None,
    warn: Callable[[str], None] = lambda message: None,
) -> PhotoResult:
    r"""Explain why ``query`` is similar to each of ``references`` and write the files.

    Args:
        loaded (LoadedModel): The model (:func:`~captum_legrad.eval.models.load_model`).
        query (Path): The photo to explain.
        references (Sequence[Path]): The reference photos (any size: each is preprocessed
                    as the model expects).
        out (OutputFolder): Where to write.
        model_name (str, optional): The model as the user named it (figure title).
                    Default: ""
        layers (Sequence[int], optional): LeGrad's blocks.
                    Default: None (all)
        fmt (str, optional): Figure format.
                    Default: "png"
        device (torch.device, optional): Where to run.
                    Default: None (CPU)
        warn (callable, optional): Called with each warning (one line).

    Returns:
        A :class:`~captum_legrad.eval.explain.PhotoResult`: the references' names, the
        cosine similarities and the files (all of them, or none on failure).

    Raises:
        ExplainError: A missing or unreadable file, a model without an image embedding.
    """
    from .. import viz
    from ..attribution import LeGrad
    from ..scores.image import ImageImageSimilarity

    if not references:
        raise ExplainError("--like needs at least one reference image")
    for path in [query, *references]:
        if not path.is_file():
            raise ExplainError(f"no such image: {path}")
    photo = open_photo(query)
    pictures = [open_photo(path) for path in references]
    device = device if device is not None else torch.device("cpu")
    model = feature_model(loaded, model_name or "this model").to(device).eval()
    if loaded.random_init:
        warn("the model has random weights: its maps and similarities show nothing learned")
    x = loaded.prepare(photo)[None].to(device)
    refs = torch.stack([loaded.prepare(p) for p in pictures]).to(device)
    try:
        sim = ImageImageSimilarity.from_images(model, refs)
        legrad = LeGrad(sim, layers=layers)
    except (TypeError, ValueError) as error:
        raise ExplainError(f"--like: {' '.join(str(error).split())}") from error
    size = (int(x.shape[-2]), int(x.shape[-1]))
    with torch.no_grad(), at_input_size(legrad.spec.input_size, size, family=legrad.spec.family):
        scores = sim(x)[0].float().cpu()
    targets = list(range(len(references)))
    maps = legrad.attribute_multi(x, targets=targets, output="map")[0]
    projected = loaded.preprocessing().geometry(photo.size[1], photo.size[0])
    on_photo = projected.project(maps.float().cpu())
    names = [path.name for path in references]
    result = PhotoResult(
        photo=query, targets=targets, names=names, scores=[float(s) for s in scores]
    )
    label = model_label(model_name, loaded) if model_name else ""
    titles = [f"like {name}\nsimilarity {format_score(s)}" for name, s in zip(names, result.scores)]
    heading = f"{query.name}: LeGrad of the similarity" + (f", {label}" if label else "")
    figure = viz.plot_photo(photo, on_photo, titles, suptitle=heading)
    base = photo_names([query])[query]
    taken: set = set()
    ref_names = photo_names(references)
    npy_names = [
        unique_name(f"{base}_like_{safe_name(ref_names[p])}", taken) + ".npy" for p in references
    ]
    figure_name = unique_name(f"{base}_like", taken) + f".{fmt}"
    try:
        for k, name in enumerate(npy_names):
            result.files.append(out.save_npy(name, on_photo[k].numpy().astype("float32")))
        result.files.append(out.save_figure(figure_name, figure, fmt))
    except BaseException:
        for written in result.files:
            written.unlink(missing_ok=True)
        raise
    return result


def like_lines(result: PhotoResult, out: Path) -> List[str]:
    """What the command prints: one line per reference, then the files."""
    lines = [
        f"{result.photo.name} like {name}: similarity {format_score(score)}"
        for name, score in zip(result.names, result.scores)
    ]
    lines.append(
        f"wrote {len(result.files)} files to {out}: " + ", ".join(p.name for p in result.files)
    )
    return lines
