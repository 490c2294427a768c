"""OpenCLIP adapter: CLIP / CoCa ``VisionTransformer`` and SigLIP through ``TimmModel``.

Works with open_clip 2.23 (blocks exchange sequence-first ``(N, B, D)`` tensors) and 3.x
(batch-first). The whole ``CLIP`` / ``CustomTextCLIP`` / ``CoCa`` model or its ``.visual``
is accepted; the readouts give the image embedding (``scores_are_features``), so
``ImageTextSimilarity`` / ``ImageImageSimilarity`` turn them into cosines with prompts or
reference images, and ``FeatureDirection`` into projections.

Readouts:

* ``pooling="mean"`` (reference code): ``ln_post(mean over all tokens of Z) @ proj``;
* ``pooling="model"``: the tower's own pooling (``tok`` / ``avg``, ``final_ln_after_pool``);
* CoCa (``attn_pool``): the pooler's attention is differentiated, first latent query only;
  the readout is the model's own ``ln_post(attn_pool(Z))[:, 0] @ proj`` for both poolings
  (the reference skips ``ln_post``);
* towers wrapped through ``TimmModel`` (SigLIP / SigLIP 2 MAP ViTs, EVA, ViTamin, PE-Core,
  MobileCLIP-B, ...): the timm trunk's spec (:mod:`captum_legrad.adapters.timm`), followed by
  the tower's projection head.

Image towers that are not Vision Transformers are refused with
:class:`~captum_legrad.UnsupportedModelError`: ``ModifiedResNet`` (``RN50``, ...) and
``TimmModel`` trunks the timm adapter does not describe (ConvNeXt, FastViT of MobileCLIP-S,
Swin).

Other input sizes (the authors run CLIP at 448² on 224² models): ``positional_embedding`` is
resampled for the call as the reference does (timm's ``resample_abs_pos_embed``: bicubic,
antialias, the class row kept), in the calling thread only, without writing it into the
model (:mod:`captum_legrad._core.resize`); SigLIP towers use the timm trunk's rule.
"""

from __future__ import annotations

import dataclasses
from typing import Any, List, Optional, Tuple

from torch import Tensor, nn

from .._core.resize import InputSize, resample_position_embedding, substitute_during
from ..errors import UnsupportedModelError
from ..spec import TokenInput, ViTSpec
from .common import floor_grid, mlp_outputs, pair

__all__ = ["match"]


_NEEDS = (
    "LeGrad needs a Vision Transformer image tower: transformer blocks whose self-attention "
    "runs over prefix tokens and one grid of patch tokens"
)


def _visual(model: nn.Module) -> Optional[nn.Module]:
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer

    for candidate in (model, getattr(model, "visual", None)):
        if isinstance(candidate, (VisionTransformer, TimmModel)):
            return candidate
        if isinstance(candidate, ModifiedResNet):
            raise UnsupportedModelError(
                f"This OpenCLIP model's image tower is a ModifiedResNet (the RN50 / RN101 "
                f"family: a CNN with an attention-pooling head). {_NEEDS}; use a ViT-* "
                "configuration instead."
            )
    return None


def _input_size(visual: Any, patch: Tuple[int, int]) -> InputSize:
    native = pair(visual.image_size)
    old_grid = pair(visual.grid_size)

    def replacements(grid: Tuple[int, int]) -> List[Tuple[Tensor, Tensor]]:
        table = visual.positional_embedding
        return [(table, resample_position_embedding(table, old_grid, grid, 1))]

    return InputSize(
        native,
        patch,
        enter=substitute_during(visual, replacements, patch),
        mechanism="positional_embedding resampled bicubic with antialias for the call, as "
        "the reference code does",
    )


def _vit_spec(visual: Any) -> ViTSpec:
    blocks = tuple(visual.transformer.resblocks)
    patch = pair(visual.patch_size)
    # open_clip 3.x records the layout; 2.23 always ran its transformer sequence-first.
    batch_first = bool(getattr(visual.transformer, "batch_first", False))
    attn_pool = getattr(visual, "attn_pool", None)
    if attn_pool is not None and getattr(visual, "attn_pool_contrastive", None) is not None:
        raise UnsupportedModelError(
            "OpenCLIP towers with two attention poolers (attn_pool_contrastive) are not "
            "supported; pass spec=ViTSpec(...) naming the pooler to differentiate."
        )

    def project(pooled: Tensor) -> Tensor:
        return pooled @ visual.proj if visual.proj is not None else pooled

    def model_readout(tokens: Tensor) -> Tensor:
        if attn_pool is not None:
            pooled, _ = visual._global_pool(visual.ln_post(attn_pool(tokens)))
        elif getattr(visual, "final_ln_after_pool", False):
            pooled, _ = visual._global_pool(tokens)
            pooled = visual.ln_post(pooled)
        else:
            pooled, _ = visual._global_pool(visual.ln_post(tokens))
        return project(pooled)

    def mean_readout(tokens: Tensor) -> Tensor:
        return project(visual.ln_post(tokens.mean(dim=1)))

    return ViTSpec(
        family="open_clip",
        token_mean_readout=attn_pool is None,
        root=visual,
        blocks=blocks,
        attentions=tuple(block.attn for block in blocks),
        readout=None if attn_pool is not None else mean_readout,
        model_readout=model_readout,
        num_prefix_tokens=1,
        patch_size=patch,
        grid=floor_grid(patch),
        pool_attention=attn_pool,
        pool_query=0 if attn_pool is not None else None,
        batch_first=batch_first,
        # ``q_x`` (ResidualAttentionBlock) or ``x`` (CustomResidualAttentionBlock)
        token_input=TokenInput.of(blocks[0]),
        input_size=_input_size(visual, patch),
        mlp_outputs=mlp_outputs(blocks, {"ResidualAttentionBlock": ("mlp.c_proj",)}),
    )


def _timm_tower_spec(visual: Any) -> ViTSpec:
    from . import timm as timm_adapter

    trunk_spec = timm_adapter.match(visual.trunk)
    if trunk_spec is None:
        raise UnsupportedModelError(
            f"This OpenCLIP model's image tower wraps a timm {type(visual.trunk).__name__} "
            f"(TimmModel), which is not a Vision Transformer LeGrad recognises. {_NEEDS}; "
            "timm VisionTransformer and Eva trunks are supported (SigLIP, EVA, ViTamin, ...)."
        )
    head = visual.head
    trunk_readout, trunk_model_readout = trunk_spec.read("mean"), trunk_spec.model_readout

    def model_readout(tokens: Tensor) -> Tensor:
        return head(trunk_model_readout(tokens))

    def mean_readout(tokens: Tensor) -> Tensor:
        return head(trunk_readout(tokens))

    return dataclasses.replace(
        trunk_spec,
        family="open_clip",
        root=visual,
        readout=None if trunk_spec.pool_attention is not None else mean_readout,
        model_readout=model_readout,
    )


def match(model: nn.Module) -> Optional[ViTSpec]:
    """Describe an OpenCLIP model or vision tower; ``None`` for anything else.

    Raises:
        UnsupportedModelError: the image tower is not a Vision Transformer (``ModifiedResNet``,
            a ``TimmModel`` with a ConvNeXt / FastViT / Swin trunk).
    """
    from open_clip.timm_model import TimmModel

    visual = _visual(model)
    if visual is None:
        return None
    spec = _timm_tower_spec(visual) if isinstance(visual, TimmModel) else _vit_spec(visual)
    # every OpenCLIP image tower returns the image embedding, never class scores
    return dataclasses.replace(spec, scores_are_features=True)
