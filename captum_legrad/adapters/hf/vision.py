"""Hugging Face ``transformers`` vision models: ViT, CLIP, MetaCLIP 2, DINOv2 (with registers)
and SigLIP (the other families are in :mod:`.families`).

Recognised here (transformers 4.4x and 5.x):

* ``ViTForImageClassification``, ``ViTModel``;
* ``CLIPModel``, ``CLIPVisionModel``, ``CLIPVisionModelWithProjection``,
  ``CLIPForImageClassification`` (and 4.x's inner ``CLIPVisionTransformer``);
* ``Dinov2Model``, ``Dinov2ForImageClassification``, ``Dinov2WithRegistersModel``,
  ``Dinov2WithRegistersForImageClassification``;
* ``SiglipModel``, ``SiglipVisionModel``, ``SiglipForImageClassification`` (and 4.x's
  inner ``SiglipVisionTransformer``);
* ``MetaClip2Model``, ``MetaClip2VisionModel``, ``MetaClip2VisionModelWithProjection``,
  ``MetaClip2ForImageClassification`` (CLIP's architecture and readouts).
* SigLIP2 (NaFlex, per-sample grids): :mod:`.siglip2`.

The readouts, ``pooling="model"`` (equal to the model's real output at the last layer)
and ``pooling="mean"`` (``z = Z.mean(1)``, the final norm, the head):

- ViT classification: ``classifier(layernorm(Z)[:, 0])`` / ``classifier(layernorm(z))``;
- ViTModel: ``pooler(layernorm(Z))`` / ``pooler`` on ``layernorm(z)`` as token 0 (without
  a pooler: ``layernorm(Z)[:, 0]`` / ``layernorm(z)``);
- CLIP vision: ``post_layernorm(Z[:, 0])`` / ``post_layernorm(z)``, then ``proj``;
- CLIP classification: ``classifier(Z[:, 1:].mean(1))`` / ``classifier(z)``;
- DINOv2 classification: ``classifier(cat(y[:, 0], y[:, P:].mean(1)))`` /
  ``classifier(cat(n, n))``; DINOv2 model: ``y[:, 0]`` / ``n``;
- SigLIP with its MAP head: ``head(post_layernorm(Z))`` for both (an attention pool);
  without a head: ``post_layernorm(Z).mean(1)`` / ``post_layernorm(z)``;
- SigLIP classification: ``classifier(post_layernorm(Z).mean(1))`` /
  ``classifier(post_layernorm(z))``.

(``y = layernorm(Z)``, ``n = layernorm(z)``, ``proj`` = ``visual_projection`` where the
model has one.) Multimodal models (``CLIPModel``, ``SiglipModel``) take text as their
first forward argument: ``LeGrad(model)`` runs ``get_image_features`` instead
(``ViTSpec.image_forward``; image-embedding dimensions are the targets), and
:class:`~captum_legrad.ImageTextSimilarity` makes the prompts the targets.

Other input sizes: the model's own ``interpolate_pos_encoding`` is switched on for the
call, by a forward pre-hook of the embeddings module acting in the calling thread only
(the user need not pass it); DINOv2 interpolates by itself.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from ...spec import ViTSpec
from .common import (
    build_spec,
    image_features_forward,
    is_instance_of,
    version_at_least,
    vision_tower,
)

__all__ = ["match"]


# ---------------------------------------------------------------------------- ViT


def _match_vit(model: nn.Module) -> Optional[ViTSpec]:
    if is_instance_of(model, "vit.modeling_vit", "ViTForImageClassification"):
        classifier_model: Any = model
        vit: Any = classifier_model.vit

        def cls_logits(tokens: Tensor) -> Tensor:
            return classifier_model.classifier(vit.layernorm(tokens)[:, 0])

        def mean_logits(tokens: Tensor) -> Tensor:
            return classifier_model.classifier(vit.layernorm(tokens.mean(dim=1)))

        return build_spec(
            vit,
            "attention",
            mean_readout=mean_logits,
            model_readout=cls_logits,
            num_prefix_tokens=1,
        )
    if is_instance_of(model, "vit.modeling_vit", "ViTModel"):
        base: Any = model
        pooler: Optional[nn.Module] = base.pooler

        def model_pooled(tokens: Tensor) -> Tensor:
            normed = base.layernorm(tokens)
            return pooler(normed) if pooler is not None else normed[:, 0]

        def mean_pooled(tokens: Tensor) -> Tensor:
            # The pooler reads token 0: give it the normalised mean token there.
            normed = base.layernorm(tokens.mean(dim=1))
            return pooler(normed.unsqueeze(1)) if pooler is not None else normed

        return build_spec(
            base,
            "attention",
            mean_readout=mean_pooled,
            model_readout=model_pooled,
            num_prefix_tokens=1,
        )
    return None


# ---------------------------------------------------------------------------- CLIP


def _match_clip(
    model: nn.Module, module: str = "clip.modeling_clip", prefix: str = "CLIP"
) -> Optional[ViTSpec]:
    """CLIP, and architectures that are CLIP's under another name (MetaCLIP 2)."""
    if is_instance_of(model, module, f"{prefix}ForImageClassification"):
        classifier_model: Any = model
        tower = vision_tower(model)

        def patch_mean_logits(tokens: Tensor) -> Tensor:
            return classifier_model.classifier(tokens[:, 1:].mean(dim=1))

        def mean_logits(tokens: Tensor) -> Tensor:
            return classifier_model.classifier(tokens.mean(dim=1))

        return build_spec(
            tower,
            "self_attn",
            mean_readout=mean_logits,
            model_readout=patch_mean_logits,
            num_prefix_tokens=1,
        )
    if not is_instance_of(
        model,
        module,
        f"{prefix}Model",
        f"{prefix}VisionModel",
        f"{prefix}VisionModelWithProjection",
        f"{prefix}VisionTransformer",
    ):
        return None
    tower = vision_tower(model)
    vision: Any = tower
    projection: Optional[nn.Module] = getattr(model, "visual_projection", None)

    def embed(pooled: Tensor) -> Tensor:
        pooled = vision.post_layernorm(pooled)
        return projection(pooled) if projection is not None else pooled

    def cls_embedding(tokens: Tensor) -> Tensor:
        return embed(tokens[:, 0])

    def mean_embedding(tokens: Tensor) -> Tensor:
        return embed(tokens.mean(dim=1))

    return build_spec(
        tower,
        "self_attn",
        mean_readout=mean_embedding,
        model_readout=cls_embedding,
        num_prefix_tokens=1,
        image_forward=image_features_forward(model),
    )


# ---------------------------------------------------------------------------- DINOv2


def _match_dinov2(model: nn.Module) -> Optional[ViTSpec]:
    plain = "dinov2.modeling_dinov2"
    registers = "dinov2_with_registers.modeling_dinov2_with_registers"
    if is_instance_of(model, plain, "Dinov2ForImageClassification") or is_instance_of(
        model, registers, "Dinov2WithRegistersForImageClassification"
    ):
        classifier_model: Any = model
        base: Any = getattr(classifier_model, "dinov2", None)
        if base is None:
            base = classifier_model.dinov2_with_registers
    elif is_instance_of(model, plain, "Dinov2Model") or is_instance_of(
        model, registers, "Dinov2WithRegistersModel"
    ):
        classifier_model, base = None, model
    else:
        return None
    n_prefix = 1 + int(getattr(base.config, "num_register_tokens", 0) or 0)
    # The classifier averages the patch tokens; before transformers 4.52 (PR #37836) the
    # registers were averaged with them.
    first_patch = n_prefix if version_at_least(4, 52) else 1

    if classifier_model is None:

        def model_readout(tokens: Tensor) -> Tensor:
            return base.layernorm(tokens)[:, 0]

        def mean_readout(tokens: Tensor) -> Tensor:
            return base.layernorm(tokens.mean(dim=1))

    else:

        def model_readout(tokens: Tensor) -> Tensor:
            normed = base.layernorm(tokens)
            features = torch.cat([normed[:, 0], normed[:, first_patch:].mean(dim=1)], dim=1)
            return classifier_model.classifier(features)

        def mean_readout(tokens: Tensor) -> Tensor:
            pooled = base.layernorm(tokens.mean(dim=1))
            return classifier_model.classifier(torch.cat([pooled, pooled], dim=1))

    return build_spec(
        base,
        "attention",
        mean_readout=mean_readout,
        model_readout=model_readout,
        num_prefix_tokens=n_prefix,
    )


# ---------------------------------------------------------------------------- SigLIP


def _match_siglip(model: nn.Module) -> Optional[ViTSpec]:
    module = "siglip.modeling_siglip"
    if is_instance_of(model, module, "SiglipForImageClassification"):
        classifier_model: Any = model
        tower = vision_tower(model)
        norm: Any = tower.post_layernorm
        # The classifier averages all tokens; transformers < 4.43 averaged them from the
        # second on (``sequence_output[:, 1:]``, although SigLIP has no class token): the
        # model's own readout is what that release computes. Its forward pools inline, so
        # there is no attribute to detect this by.
        first = 0 if version_at_least(4, 43) else 1

        def norm_then_mean_logits(tokens: Tensor) -> Tensor:
            return classifier_model.classifier(norm(tokens)[:, first:].mean(dim=1))

        def mean_then_norm_logits(tokens: Tensor) -> Tensor:
            return classifier_model.classifier(norm(tokens.mean(dim=1)))

        return build_spec(
            tower,
            "self_attn",
            mean_readout=mean_then_norm_logits,
            model_readout=norm_then_mean_logits,
            num_prefix_tokens=0,
        )
    if not is_instance_of(
        model, module, "SiglipModel", "SiglipVisionModel", "SiglipVisionTransformer"
    ):
        return None
    tower = vision_tower(model)
    vision: Any = tower
    attention_pool: Optional[nn.Module] = getattr(vision, "head", None)
    if not getattr(vision, "use_head", attention_pool is not None):
        attention_pool = None
    if attention_pool is not None:
        pool: nn.Module = attention_pool

        def pooled(tokens: Tensor) -> Tensor:
            return pool(vision.post_layernorm(tokens))

        return build_spec(
            tower,
            "self_attn",
            mean_readout=None,  # an attention pool has no mean-pooled variant
            model_readout=pooled,
            num_prefix_tokens=0,
            pool_attention=pool,
            image_forward=image_features_forward(model),
        )

    def norm_then_mean(tokens: Tensor) -> Tensor:
        return vision.post_layernorm(tokens).mean(dim=1)

    def mean_then_norm(tokens: Tensor) -> Tensor:
        return vision.post_layernorm(tokens.mean(dim=1))

    return build_spec(
        tower,
        "self_attn",
        mean_readout=mean_then_norm,
        model_readout=norm_then_mean,
        num_prefix_tokens=0,
        image_forward=image_features_forward(model),
    )


def _match_metaclip2(model: nn.Module) -> Optional[ViTSpec]:
    return _match_clip(model, "metaclip_2.modeling_metaclip_2", "MetaClip2")


_MATCHERS = (_match_vit, _match_clip, _match_metaclip2, _match_dinov2, _match_siglip)


def match(model: nn.Module) -> Optional[ViTSpec]:
    """Describe a transformers ViT, CLIP, MetaCLIP 2, DINOv2 or SigLIP vision model;
    ``None`` otherwise."""
    for matcher in _MATCHERS:
        spec = matcher(model)
        if spec is not None:
            return spec
    return None
