"""Scores of a model's image embedding: what the score wrappers share.

A feature model (timm ``num_classes=0``, HF ``Dinov2Model``, ``CLIPVisionModelWithProjection``,
OpenCLIP, ...) returns an image embedding ``(B, D)``, not class scores. An
:class:`EmbeddingScores` wrapper turns that embedding into ``K`` scores ``(B, K)`` (cosines
with prompts or reference images, projections on directions) and describes itself to LeGrad
(``legrad_spec``): per layer, the embedding is read out as the adapter reads the model
(``pooling="mean"``: mean over all tokens, the final norm, the projection if any;
``pooling="model"``: the model's own pooling), then the scores are taken of it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

from torch import Tensor, nn

from .._core.hooks import ScopedHooks
from .._core.resize import at_input_size
from ..discovery import discover
from ..errors import UnsupportedModelError
from ..spec import ViTSpec

__all__ = ["EmbeddingScores", "image_embeddings", "check_embeddings", "resolve_spec"]


def resolve_spec(model: nn.Module, spec: Optional[ViTSpec], wrapper: str) -> ViTSpec:
    """``spec``, or :func:`~captum_legrad.discover`'s spec of ``model``.

    Raises:
        UnsupportedModelError: ``model`` is not a Vision Transformer captum_legrad
            recognises; the message says that ``wrapper`` needs an image embedding.
    """
    if spec is not None:
        return spec
    try:
        return discover(model)
    except UnsupportedModelError as error:
        raise UnsupportedModelError(
            f"{wrapper} needs a model with an image embedding (a Vision Transformer "
            f"captum_legrad recognises, or spec=ViTSpec(...)): {error}"
        ) from error


def image_embeddings(spec: ViTSpec, images: Tensor, *args: Any, resize: bool = True) -> Tensor:
    """The model's own image embedding of ``images``: the last block's tokens read out by
    ``spec.model_readout`` (which equals the model's output: the readout contract).

    With ``resize`` the model runs at the images' size as LeGrad runs it (the position
    embedding resampled for the call where needed, nothing written into the model);
    without, as it is (inside LeGrad's call, which does that itself). Under the caller's
    grad mode. ``args`` go to the model after the images (SigLIP2: its mask and grids).

    Raises:
        ValueError: the size is not one the model can run at (see
            :func:`~captum_legrad.internals.InputSize`).
    """
    last: Dict[str, Any] = {}

    def keep(module: nn.Module, inputs: Any, output: Any) -> None:
        last["tokens"] = output[0] if isinstance(output, (tuple, list)) else output

    image_forward = spec.image_forward
    # the root's own image forward (ViT-MAE: it fixes the patch order); a multimodal model's
    # get_image_features belongs to the model, not to its vision tower (the root)
    run: Any = spec.root
    if image_forward is not None and getattr(image_forward, "__self__", None) is spec.root:
        run = image_forward
    size = (int(images.shape[-2]), int(images.shape[-1])) if images.dim() == 4 else None
    with ScopedHooks() as hooks:
        hooks.forward(spec.blocks[-1], keep)
        if size is None or not resize:  # NaFlex patches: the grids come with the arguments
            run(images, *args)
        else:
            with at_input_size(spec.input_size, size, family=spec.family):
                run(images, *args)
    tokens = last["tokens"] if spec.batch_first else last["tokens"].transpose(0, 1)
    extra = spec.extra_readout_inputs((images, *args), tokens.shape[0])
    embedding: Tensor = spec.model_readout(tokens, *extra)
    return embedding


def check_embeddings(embeddings: Tensor, dim: int, what: str, remedy: str) -> None:
    """Raise a ``ValueError`` unless ``embeddings`` is ``(B, dim)``.

    Args:
        embeddings: The model's image embeddings (a layer's readout).
        dim: The dimension of the rows they are compared with.
        what: Those rows, in words (``"the 3 reference embeddings"``).
        remedy: What to do, in words.
    """
    if embeddings.dim() != 2:
        raise ValueError(
            f"The model's image embedding has shape {tuple(embeddings.shape)}, not (B, D): "
            "its readout returns per-token features. Build the model with a global pool "
            "(timm: global_pool='token' or 'avg'), or describe one with spec=ViTSpec(...)."
        )
    if embeddings.shape[-1] != dim:
        raise ValueError(
            f"The model's image embedding has {embeddings.shape[-1]} dimensions but {what} "
            f"have {dim}: {remedy}"
        )


class EmbeddingScores(nn.Module):
    r"""Scores ``(B, K)`` of a model's image embedding, as an explainable model.

    The base of :class:`~captum_legrad.ImageImageSimilarity`,
    :class:`~captum_legrad.ImageTextSimilarity` and :class:`~captum_legrad.FeatureDirection`;
    a subclass defines :meth:`scores`. ``forward(images)`` is ``scores(embedding)`` with the
    model's own embedding, and :meth:`legrad_spec` gives LeGrad the per-layer score
    ``scores(readout(Z^l))``, the readout being the model's (``LeGrad(wrapper,
    pooling=...)`` chooses ``"mean"`` or ``"model"``), so score ``k`` is ``target=k``.

    Args:
        model (nn.Module): A Vision Transformer captum_legrad recognises (or the module
                    ``spec`` describes) whose readout is its image embedding.
        spec (ViTSpec, optional): The model's spec, instead of
                    :func:`~captum_legrad.discover`.
    """

    def __init__(self, model: nn.Module, *, spec: Optional[ViTSpec] = None) -> None:
        super().__init__()
        self.model = model
        self.vision_spec = resolve_spec(model, spec, type(self).__name__)

    def scores(self, embeddings: Tensor) -> Tensor:
        """The ``(B, K)`` scores of ``(B, D)`` image embeddings."""
        raise NotImplementedError(f"{type(self).__name__} must define scores(embeddings).")

    def embed(self, images: Tensor, *args: Any) -> Tensor:
        """The model's own image embedding ``(B, D)`` of ``images``, at any size LeGrad
        explains (:func:`image_embeddings`): ``scores(embed(x))`` is ``forward(x)`` there."""
        return image_embeddings(self.vision_spec, images, *args)

    def forward(self, images: Tensor, *args: Any) -> Tensor:
        """The scores ``(B, K)`` of ``images``' embedding.

        The model runs as it is (LeGrad runs it at other input sizes for its call; outside
        LeGrad, ``scores(embed(x))`` does). ``args`` go to the model after the images
        (SigLIP2: ``pixel_attention_mask, spatial_shapes``; ``images`` are then its
        flattened patches).
        """
        return self.scores(image_embeddings(self.vision_spec, images, *args, resize=False))

    def legrad_spec(self) -> ViTSpec:
        """The model's spec, each layer's embedding read out as these scores."""
        spec = self.vision_spec
        mean_readout, model_readout = spec.read("mean"), spec.model_readout

        def mean_scores(tokens: Tensor, *extra: Any) -> Tensor:
            return self.scores(mean_readout(tokens, *extra))

        def model_scores(tokens: Tensor, *extra: Any) -> Tensor:
            return self.scores(model_readout(tokens, *extra))

        return dataclasses.replace(
            spec,
            readout=None if spec.pool_attention is not None else mean_scores,
            model_readout=model_scores,
            scores_are_features=False,
        )
