"""timm adapter: ``VisionTransformer`` (vit_*, deit*, DINOv2 with registers, SigLIP MAP,
avg-pool heads, dynamic image sizes), ``Eva``, ``Beit`` and ``VisionTransformerRelPos``.

These classes share the layout ``patch_embed → blocks[i].attn → norm → pool → fc_norm →
head``; ``forward_head`` is the model's own readout. CaiT, ConViT, XCiT, SAM and the VLM
vision towers are described in :mod:`.timm_families`, which also refuses every other timm
model with the reason.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

from torch import Tensor, nn

from ..spec import TokenInput, ViTSpec
from .common import floor_grid, pair

__all__ = ["match"]


def _is_timm_vit(model: nn.Module) -> bool:
    from timm.models.beit import Beit
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer
    from timm.models.vision_transformer_relpos import VisionTransformerRelPos

    return isinstance(model, (VisionTransformer, Eva, Beit, VisionTransformerRelPos))


def match(model: nn.Module) -> Optional[ViTSpec]:
    """Describe a timm ViT; ``None`` for a module that is not a timm model.

    Raises:
        UnsupportedModelError: a timm model without global token attention (hierarchical,
            windowed, convolutional), with the reason.
    """
    if not _is_timm_vit(model):
        from .timm_families import match_other

        return match_other(model)
    vit: Any = model  # timm's module attributes are untyped
    patch_embed = vit.patch_embed
    patch_size = pair(patch_embed.patch_size)
    floor = floor_grid(patch_size)
    blocks = tuple(vit.blocks)
    from .timm_families import refuse_blocks

    refuse_blocks(vit, blocks)
    # Blocks without a separate ``attn`` module (parallel variants) compute attention
    # inline; recording inside the whole block finds it there.
    attentions = tuple(getattr(block, "attn", block) for block in blocks)
    attn_pool: Optional[nn.Module] = getattr(vit, "attn_pool", None)

    def grid(height: int, width: int) -> Tuple[int, int]:
        if hasattr(patch_embed, "dynamic_feat_size"):
            g_h, g_w = patch_embed.dynamic_feat_size((height, width))
            return int(g_h), int(g_w)
        return floor(height, width)

    def model_readout(tokens: Tensor) -> Tensor:
        return vit.forward_head(vit.norm(tokens))

    def mean_readout(tokens: Tensor) -> Tensor:
        pooled = vit.norm(tokens.mean(dim=1))
        return vit.head(vit.head_drop(vit.fc_norm(pooled)))

    return ViTSpec(
        family="timm",
        root=vit,
        blocks=blocks,
        attentions=attentions,
        readout=None if attn_pool is not None else mean_readout,
        model_readout=model_readout,
        num_prefix_tokens=int(vit.num_prefix_tokens),
        patch_size=patch_size,
        grid=grid,
        pool_attention=attn_pool,
        token_input=TokenInput("x"),
    )
