"""Open-vocabulary targets: explain image-text similarity, prompt ``k`` as ``target=k``."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..spec import ViTSpec
from .embedding import EmbeddingScores, check_embeddings

__all__ = ["ImageTextSimilarity"]


class ImageTextSimilarity(EmbeddingScores):
    r"""Cosine similarity of images with ``K`` text embeddings, as an explainable model.

    ``forward(images)`` returns ``(B, K)`` cosine similarities between the model's image
    embedding and each (L2-normalised) text embedding, so ``LeGrad(ImageTextSimilarity(
    model, text))`` explains prompt ``k`` as ``target=k`` and
    :meth:`~captum_legrad.LeGrad.attribute_multi` explains all prompts from one image
    forward. Captum Insights can use it as a model whose classes are the prompts.

    The per-layer score LeGrad differentiates is the cosine of the layer's readout (for
    OpenCLIP CLIP, ``ln_post(mean Z) @ proj``, as in the reference code) with each prompt.

    Args:
        model (nn.Module): A supported image-text model or its vision tower (OpenCLIP
                    ``CLIP`` / ``CoCa`` or ``.visual``, HF ``CLIPModel`` / ``SiglipModel`` /
                    ``Siglip2Model`` or their vision models, ...). For SigLIP2, call it
                    (and LeGrad) with ``pixel_values`` and ``additional_forward_args=
                    (pixel_attention_mask, spatial_shapes)``.
        text_embeddings (Tensor): ``(K, D)`` text embeddings, one per prompt.
        spec (ViTSpec, optional): The vision tower's spec, instead of
                    :func:`~captum_legrad.discover`.

    Examples::

        >>> sim = ImageTextSimilarity(clip_model, clip_model.encode_text(tokens))
        >>> maps = LeGrad(sim).attribute_multi(images, targets=range(len(tokens)))
    """

    def __init__(
        self, model: nn.Module, text_embeddings: Tensor, *, spec: Optional[ViTSpec] = None
    ) -> None:
        if not isinstance(text_embeddings, Tensor) or text_embeddings.dim() != 2:
            raise ValueError("text_embeddings must be a (K, D) tensor, one row per prompt.")
        super().__init__(model, spec=spec)
        self.register_buffer("text_embeddings", F.normalize(text_embeddings.detach(), dim=-1))

    @classmethod
    def from_prompts(
        cls,
        model: nn.Module,
        prompts: Sequence[str],
        tokenizer: Callable[..., Any],
        *,
        spec: Optional[ViTSpec] = None,
    ) -> ImageTextSimilarity:
        """Encode ``prompts`` with the model's text tower and ``tokenizer``.

        OpenCLIP: ``tokenizer = open_clip.get_tokenizer(name)``, text through
        ``model.encode_text``. HF: a ``transformers`` tokenizer, text through
        ``model.get_text_features``.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        tower: Any = model  # the text-tower methods are untyped
        with torch.no_grad():
            if hasattr(tower, "encode_text"):
                tokens = tokenizer(list(prompts))
                text = tower.encode_text(tokens)
            elif hasattr(tower, "get_text_features"):
                batch = tokenizer(list(prompts), padding=True, return_tensors="pt")
                text = tower.get_text_features(**batch)
                text = getattr(text, "pooler_output", text)
            else:
                raise TypeError(
                    f"{type(model).__name__} has no text tower (encode_text or "
                    "get_text_features); pass text embeddings to ImageTextSimilarity instead."
                )
        return cls(model, text, spec=spec)

    def similarity(self, image_embeddings: Tensor) -> Tensor:
        """Cosine similarity of ``(B, D)`` image embeddings with the prompts: ``(B, K)``."""
        text = self.get_buffer("text_embeddings")
        check_embeddings(
            image_embeddings,
            text.shape[-1],
            f"the {text.shape[0]} text embeddings",
            "encode the prompts with the same model's text tower "
            "(ImageTextSimilarity.from_prompts).",
        )
        return F.normalize(image_embeddings, dim=-1) @ text.to(image_embeddings).T

    def scores(self, embeddings: Tensor) -> Tensor:
        """:meth:`similarity`: the scores LeGrad explains."""
        return self.similarity(embeddings)
