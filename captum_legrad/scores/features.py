"""Explicit targets for feature models: projections of the image embedding on directions,
direction ``k`` as ``target=k`` (a linear probe's classes, SAE features, concept vectors)."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ..spec import ViTSpec
from .embedding import EmbeddingScores, check_embeddings

__all__ = ["FeatureDirection"]


class FeatureDirection(EmbeddingScores):
    r"""Projections of the image embedding on ``K`` directions, as an explainable model.

    ``forward(images)`` returns ``(B, K)``: :math:`\langle e, d_k \rangle + b_k`, the
    model's own embedding :math:`e` of each image with each direction :math:`d_k` (not
    normalised), plus the optional bias. So ``LeGrad(FeatureDirection(model, probe.weight,
    probe.bias))`` explains a linear probe's class ``k`` as ``target=k``; the rows of an
    SAE's decoder explain its features, ``torch.eye(D)`` the embedding's dimensions
    themselves. On a classifier the embedding is its class scores, and a direction is a
    combination of classes (``e_a - e_b``: class ``a`` against class ``b``).

    The per-layer score is the projection of layer ``l``'s embedding, read out as the
    library reads every model (``docs/method.md``, "Models without a classifier"):
    ``LeGrad(..., pooling="mean")`` (default) or ``pooling="model"`` (the model's own
    pooling: the last layer's score is ``forward(x)``).

    Args:
        model (nn.Module): A Vision Transformer captum_legrad recognises, feature models
                    included (timm ``num_classes=0``, HF ``Dinov2Model``, OpenCLIP, ...).
        directions (Tensor): ``(K, D)``, one direction per target, in the embedding's
                    space (``D`` its dimension).
        bias (Tensor, optional): ``(K,)`` added to the projections (a probe's bias; it
                    does not change the maps).
                    Default: None
        spec (ViTSpec, optional): The model's spec, instead of
                    :func:`~captum_legrad.discover`.

    Raises:
        UnsupportedModelError: The model is not a ViT captum_legrad recognises.
        ValueError: ``directions`` is not a non-empty ``(K, D)`` float tensor, or
                    ``bias`` not ``(K,)``; at the first call, when ``D`` is not the
                    model's embedding dimension.

    Examples::

        >>> probe = torch.nn.Linear(384, 10)  # trained on the model's embeddings
        >>> explain = LeGrad(FeatureDirection.from_linear(dinov2, probe))
        >>> heat = explain.attribute(images, target=labels, output="map")
    """

    def __init__(
        self,
        model: nn.Module,
        directions: Tensor,
        bias: Optional[Tensor] = None,
        *,
        spec: Optional[ViTSpec] = None,
    ) -> None:
        if (
            not isinstance(directions, Tensor)
            or directions.dim() != 2
            or directions.shape[0] == 0
            or not directions.is_floating_point()
        ):
            shape = (
                tuple(directions.shape)
                if isinstance(directions, Tensor)
                else type(directions).__name__
            )
            raise ValueError(
                f"directions must be a (K, D) float tensor, one direction per target (got "
                f"{shape}); e.g. a linear probe's weight, or torch.eye(D)."
            )
        if bias is not None and (
            not isinstance(bias, Tensor) or tuple(bias.shape) != (directions.shape[0],)
        ):
            shape = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
            raise ValueError(
                f"bias must be a ({directions.shape[0]},) tensor, one value per direction, "
                f"got {shape}."
            )
        super().__init__(model, spec=spec)
        self.register_buffer("directions", directions.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(
        cls, model: nn.Module, linear: nn.Linear, *, spec: Optional[ViTSpec] = None
    ) -> FeatureDirection:
        """The rows of a linear layer on the embedding (a probe): ``linear.weight`` as the
        directions and ``linear.bias`` as the bias, so ``forward`` is ``linear(embedding)``."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}.")
        return cls(model, linear.weight, linear.bias, spec=spec)

    def scores(self, embeddings: Tensor) -> Tensor:
        """The projections ``(B, K)`` of ``(B, D)`` embeddings on the directions (+ bias)."""
        directions = self.get_buffer("directions")
        check_embeddings(
            embeddings,
            directions.shape[-1],
            f"the {directions.shape[0]} directions",
            "give directions in the space of this model's embedding.",
        )
        projections = embeddings @ directions.to(embeddings).T
        bias = self.bias
        if isinstance(bias, Tensor):
            projections = projections + bias.to(embeddings)
        return projections
