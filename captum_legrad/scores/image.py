"""Image-image similarity: explain why an image is similar to reference images, reference
``k`` as ``target=k`` (retrieval, deduplication, k-NN classification)."""

from __future__ import annotations

import warnings
from typing import Any, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UnsupportedModelError
from ..spec import ViTSpec
from .embedding import EmbeddingScores, check_embeddings, image_embeddings, resolve_spec

__all__ = ["ImageImageSimilarity"]


def _needs_features(model: nn.Module, spec: ViTSpec) -> None:
    """Refuse a model whose readout is class scores: their cosine is no image similarity."""
    if not spec.scores_are_features:
        raise UnsupportedModelError(
            f"ImageImageSimilarity needs a model whose output is an image embedding, but "
            f"{type(model).__name__} ({spec.family}) returns class scores. Use the feature "
            "model: timm.create_model(name, num_classes=0), the HF base model (e.g. "
            "Dinov2Model, CLIPVisionModelWithProjection, or a classifier's .vit / .dinov2), "
            "an OpenCLIP model; or, for a custom ViTSpec whose readout is an embedding, set "
            "ViTSpec(..., scores_are_features=True)."
        )


class ImageImageSimilarity(EmbeddingScores):
    r"""Cosine similarity of images with ``K`` reference embeddings, as an explainable model.

    ``forward(images)`` returns ``(B, K)``: the cosine between the model's own embedding of
    each image and each L2-normalised reference embedding. ``LeGrad(ImageImageSimilarity(
    model, refs))`` explains reference ``k`` as ``target=k`` ("which regions make this image
    similar to reference ``k``"), and :meth:`~captum_legrad.LeGrad.attribute_multi` explains
    all references from one forward.

    The per-layer score LeGrad differentiates is the cosine of layer ``l``'s embedding with
    each reference, the embedding read out as the library reads every model
    (``docs/method.md``, "Models without a classifier"): ``LeGrad(sim, pooling="mean")``
    (the default, as for :class:`~captum_legrad.ImageTextSimilarity`): the mean over all
    tokens, the final norm, the model's projection if any; ``pooling="model"``: the model's
    own pooling (CLS token or ``pooler_output``, mean, attention pool, projection), so that
    the last layer's score is ``sim(x)``.

    Args:
        model (nn.Module): A feature model captum_legrad recognises: timm with
                    ``num_classes=0``, HF ``Dinov2Model`` / ``DINOv3ViTModel`` /
                    ``CLIPVisionModelWithProjection`` / ``SiglipVisionModel`` (any base or
                    vision model), OpenCLIP ``CLIP`` or its ``.visual`` (the embedding of
                    ``encode_image``).
        reference_embeddings (Tensor): ``(K, D)`` embeddings of the references, by the
                    same model (:meth:`from_images` computes them); L2-normalised here.
        spec (ViTSpec, optional): The model's spec, instead of
                    :func:`~captum_legrad.discover`.

    Raises:
        UnsupportedModelError: The model has no image embedding (not a ViT
                    captum_legrad recognises, or a classifier, whose outputs are class
                    scores).
        ValueError: ``reference_embeddings`` is not a non-empty ``(K, D)`` tensor; at the
                    first call, when ``D`` is not the model's embedding dimension.

    Examples::

        >>> import timm, torch
        >>> from captum_legrad import ImageImageSimilarity, LeGrad
        >>> model = timm.create_model("vit_small_patch14_dinov2", pretrained=False,
        ...                           num_classes=0, img_size=56).eval()
        >>> sim = ImageImageSimilarity.from_images(model, torch.randn(2, 3, 56, 56))
        >>> query = torch.randn(1, 3, 56, 56)
        >>> sim(query).shape  # cosines with the two references
        torch.Size([1, 2])
        >>> maps = LeGrad(sim).attribute_multi(query, targets=[0, 1])  # (1, 2, 56, 56)
    """

    def __init__(
        self,
        model: nn.Module,
        reference_embeddings: Tensor,
        *,
        spec: Optional[ViTSpec] = None,
    ) -> None:
        if (
            not isinstance(reference_embeddings, Tensor)
            or reference_embeddings.dim() != 2
            or reference_embeddings.shape[0] == 0
            or not reference_embeddings.is_floating_point()
        ):
            shape = (
                tuple(reference_embeddings.shape)
                if isinstance(reference_embeddings, Tensor)
                else type(reference_embeddings).__name__
            )
            raise ValueError(
                "reference_embeddings must be a (K, D) float tensor, one row per reference "
                f"image (got {shape}); ImageImageSimilarity.from_images(model, images) "
                "embeds reference images."
            )
        super().__init__(model, spec=spec)
        _needs_features(model, self.vision_spec)
        self.register_buffer(
            "reference_embeddings", F.normalize(reference_embeddings.detach(), dim=-1)
        )

    @classmethod
    def from_images(
        cls,
        model: nn.Module,
        images: Union[Tensor, Sequence[Tensor]],
        *args: Any,
        spec: Optional[ViTSpec] = None,
    ) -> ImageImageSimilarity:
        """References embedded by ``model`` itself: its own embedding of each image.

        The references are embedded without gradients, each at its own size (as LeGrad
        runs the model: the position embedding resampled for the call where needed); the
        model is left as it is.

        Args:
            model (nn.Module): As in the constructor.
            images (Tensor or sequence of Tensor): ``(K, C, H, W)`` reference images,
                        preprocessed as the queries are; or a sequence of ``(C, H, W)``
                        / ``(n, C, H, W)`` tensors, which may differ in size.
            *args: Further arguments of the model after the images, with a tensor of
                        images (SigLIP2: ``pixel_attention_mask, spatial_shapes`` of its
                        flattened patches).
            spec (ViTSpec, optional): As in the constructor.

        Returns:
            The :class:`ImageImageSimilarity` with one reference per image, in order.

        Raises:
            ValueError: No image, an image that is not ``(C, H, W)`` / ``(n, C, H, W)``,
                        or of a size the model cannot run at (not a multiple of the
                        patch size; another size on a model that cannot interpolate).

        Examples::

            >>> sim = ImageImageSimilarity.from_images(model, [ref_a, ref_b])
            >>> heat = LeGrad(sim).attribute(query, target=1, output="map")  # like ref_b
        """
        resolved = resolve_spec(model, spec, cls.__name__)
        _needs_features(model, resolved)
        batches: List[Tensor]
        if isinstance(images, Tensor):
            batches = [images]
        else:
            if args:
                raise ValueError("Further model arguments need the reference images as one tensor.")
            batches = [image.unsqueeze(0) if image.dim() == 3 else image for image in images]
        if not batches or any(not isinstance(b, Tensor) for b in batches):
            raise ValueError("from_images needs at least one reference image tensor.")
        if not args and any(b.dim() != 4 or b.shape[0] == 0 for b in batches):
            shapes = [tuple(b.shape) for b in batches]
            raise ValueError(
                f"Reference images must be (C, H, W) or (n, C, H, W) tensors, got {shapes}."
            )
        if resolved.root.training:
            warnings.warn(
                "The model is in training mode: dropout makes the reference embeddings "
                "random. Call model.eval() first.",
                stacklevel=2,
            )
        with torch.no_grad():
            embeddings = torch.cat([image_embeddings(resolved, b, *args) for b in batches])
        return cls(model, embeddings, spec=resolved)

    def similarity(self, image_embeddings: Tensor) -> Tensor:
        """Cosine similarity of ``(B, D)`` image embeddings with the references: ``(B, K)``."""
        references = self.get_buffer("reference_embeddings")
        check_embeddings(
            image_embeddings,
            references.shape[-1],
            f"the {references.shape[0]} reference embeddings",
            "embed the references with the same model "
            "(ImageImageSimilarity.from_images(model, images)).",
        )
        return F.normalize(image_embeddings, dim=-1) @ references.to(image_embeddings).T

    def scores(self, embeddings: Tensor) -> Tensor:
        """:meth:`similarity`: the scores LeGrad explains."""
        return self.similarity(embeddings)
