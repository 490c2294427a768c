"""timm adapter: ``VisionTransformer`` (vit_*, deit*, DINOv2 with registers, SigLIP MAP,
avg-pool heads, dynamic image sizes, parallel-attention and differential-attention blocks),
``Eva``, ``Beit`` and ``VisionTransformerRelPos``.

These classes share the layout ``patch_embed → blocks[i].attn → norm → pool → fc_norm →
head``; ``forward_head`` is the model's own readout. CaiT, ConViT, XCiT, SAM and the VLM
vision towers are described in :mod:`.families`, which also refuses every other timm
model with the reason.

Input sizes: ``dynamic_img_size=True`` models resample their position embedding (and Eva
its rotary embedding) by themselves. For static models LeGrad does what timm's dynamic path
does, for the call only: ``pos_embed`` resampled as ``resample_abs_pos_embed`` does, Eva's
rotary table rebuilt for the new grid from the model's own frequency bands, and the strict
``PatchEmbed`` size assertion waived (:mod:`captum_legrad._core.resize`).
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..._core.resize import InputSize, resample_position_embedding, substitute_during
from ...spec import TokenInput, ViTSpec
from ..common import floor_grid, mlp_outputs, pair
from .families import block_attentions

__all__ = ["match", "MLP_OUTPUTS"]

#: Block classes whose output is ``x + t(W h + b)`` (:func:`~..common.mlp_outputs`), and the
#: path of that last MLP linear.
MLP_OUTPUTS = {"Block": ("mlp.fc2",), "EvaBlock": ("mlp.fc2",)}


def _is_timm_vit(model: nn.Module) -> bool:
    from timm.models.beit import Beit
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer
    from timm.models.vision_transformer_relpos import VisionTransformerRelPos

    return isinstance(model, (VisionTransformer, Eva, Beit, VisionTransformerRelPos))


#: Messages of timm's strict ``PatchEmbed`` size assertions.
_STRICT_SIZE = ("Input height (", "Input width (")


def _rebuild_rope_table(rope: Any, grid: Tuple[int, int], cached: Tensor) -> Optional[Tensor]:
    """timm < 1.0's static ``RotaryEmbeddingCat``: it keeps no frequency bands (``bands``
    is ``None``), only the table built once by ``build_rotary_pos_embed`` from its ``dim``,
    ``temperature``, ``max_res``, ``in_pixels`` and ``ref_feat_shape``; the same call for the
    new grid gives what a ``dynamic_img_size=True`` Eva of that release computes. ``None``
    where that is not certain (pixel bands, whose spacing the module does not keep)."""
    if getattr(rope, "in_pixels", True) and not hasattr(rope, "linear_bands"):
        return None
    try:
        from timm.layers.pos_embed_sincos import build_rotary_pos_embed
    except ImportError:
        return None
    try:
        sin, cos = build_rotary_pos_embed(
            feat_shape=list(grid),
            dim=int(rope.dim),
            max_res=int(getattr(rope, "max_res", 224)),
            temperature=float(getattr(rope, "temperature", 10000.0)),
            linear_bands=bool(getattr(rope, "linear_bands", False)),
            in_pixels=bool(rope.in_pixels),
            ref_feat_shape=getattr(rope, "ref_feat_shape", None),
            dtype=cached.dtype,
            device=cached.device,
        )
    except (AttributeError, TypeError):
        return None
    table: Tensor = torch.cat((sin, cos), -1)
    return table if table.shape[-1] == cached.shape[-1] else None


def _rope_replacements(rope: Any, grid: Tuple[int, int]) -> List[Tuple[Tensor, Tensor]]:
    """Eva's cached rotary table(s) rebuilt for ``grid`` from the module's own bands."""
    if rope is None:
        return []
    cached = getattr(rope, "pos_embed", None)
    if isinstance(cached, Tensor) and hasattr(rope, "_build_embed_cat"):
        return [(cached, rope._build_embed_cat(list(grid), rope.bands, dtype=cached.dtype))]
    sin, cos = getattr(rope, "pos_embed_sin", None), getattr(rope, "pos_embed_cos", None)
    if isinstance(sin, Tensor) and isinstance(cos, Tensor) and hasattr(rope, "_build_embed"):
        new_sin, new_cos = rope._build_embed(list(grid), rope.bands, dtype=sin.dtype)
        return [(sin, new_sin), (cos, new_cos)]
    if isinstance(cached, Tensor) and getattr(rope, "bands", None) is None:
        rebuilt = _rebuild_rope_table(rope, grid, cached)
        if rebuilt is not None:
            return [(cached, rebuilt)]
    raise ValueError(
        f"This Eva's rotary embedding ({type(rope).__name__}) cannot be rebuilt for another "
        "input size by LeGrad. Build the model with dynamic_img_size=True (timm then handles "
        "any size), or use the native input size."
    )


def _input_size(vit: Any, patch_size: Tuple[int, int]) -> Optional[InputSize]:
    patch_embed = vit.patch_embed
    img_size = getattr(patch_embed, "img_size", None)
    if img_size is None:
        return None
    native = pair(img_size)
    if getattr(vit, "dynamic_img_size", False):
        return InputSize(
            native,
            patch_size,
            mechanism="timm dynamic_img_size",
            pads=bool(getattr(patch_embed, "dynamic_img_pad", False)),
        )
    old_grid = pair(patch_embed.grid_size)
    prefix = 0 if getattr(vit, "no_embed_class", False) else int(vit.num_prefix_tokens)

    def replacements(grid: Tuple[int, int]) -> List[Tuple[Tensor, Tensor]]:
        pairs: List[Tuple[Tensor, Tensor]] = []
        pos_embed = getattr(vit, "pos_embed", None)
        if isinstance(pos_embed, Tensor):
            pairs.append(
                (pos_embed, resample_position_embedding(pos_embed, old_grid, grid, prefix))
            )
        return pairs + _rope_replacements(getattr(vit, "rope", None), grid)

    return InputSize(
        native,
        patch_size,
        enter=substitute_during(vit, replacements, patch_size, _STRICT_SIZE),
        mechanism="pos_embed resampled bicubic with antialias for the call, as timm's "
        "resample_abs_pos_embed does",
    )


def match(model: nn.Module) -> Optional[ViTSpec]:
    """Describe a timm ``VisionTransformer``, ``Eva``, ``Beit`` or ``VisionTransformerRelPos``;
    ``None`` for any other module."""
    if not _is_timm_vit(model):
        return None
    vit: Any = model  # timm's module attributes are untyped
    patch_embed = vit.patch_embed
    patch_size = pair(patch_embed.patch_size)
    floor = floor_grid(patch_size)
    blocks = tuple(vit.blocks)
    parallel, products = block_attentions(vit, blocks)
    # Blocks without a separate ``attn`` module (parallel variants) compute attention
    # inline; recording inside the whole block finds it there (``ParallelThingsBlock``:
    # every branch's attention, head groups of one attention).
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
        token_mean_readout=attn_pool is None,
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
        input_size=_input_size(vit, patch_size),
        parallel_attentions=parallel,
        product_inputs=products,
        mlp_outputs=mlp_outputs(blocks, MLP_OUTPUTS),
    )
