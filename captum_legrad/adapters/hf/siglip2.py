"""Hugging Face SigLIP2 (NaFlex): ``Siglip2Model``, ``Siglip2VisionModel``,
``Siglip2ForImageClassification`` (and 4.x's inner ``Siglip2VisionTransformer``).

SigLIP2 takes flattened patches ``pixel_values (B, N, p·p·C)`` with a padding mask
``pixel_attention_mask (B, N)`` and each sample's patch grid ``spatial_shapes (B, 2)``:
sample ``b``'s ``h_b · w_b`` patches are its first rows in row-major order, the rest is
padding. With Captum: ``LeGrad(model).attribute(pixel_values, target,
additional_forward_args=(pixel_attention_mask, spatial_shapes))``.

The layout (:class:`~captum_legrad.spec.PatchLayout` with per-sample ``grids``) places each
sample's patch keys on its own grid; padding keys never appear. The readouts pool only the
valid tokens, with the mask the model itself uses:

- with the MAP head (``vision_use_head``): ``head(post_layernorm(Z), mask)`` for both
  poolings (an attention pool, differentiated like SigLIP's);
- without it: ``masked_mean(post_layernorm(Z))`` / ``post_layernorm(masked_mean(Z))``;
- classification: ``classifier`` of those two.

``Siglip2Model`` takes text first: ``LeGrad(model)`` runs ``get_image_features`` (same
arguments as the vision model). Added to transformers in 4.50 (and the
``v4.49.0-SigLIP-2`` tag); older releases have no ``transformers.models.siglip2``.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import Tensor, nn

from ...errors import CaptureError
from ...spec import PatchLayout, TokenInput, ViTSpec
from ..common import floor_grid, pair
from .common import (
    attention_of,
    image_features_forward,
    is_instance_of,
    layers_of,
    vision_tower,
)

__all__ = ["match", "masked_mean", "siglip2_layout"]

_MODULE = "siglip2.modeling_siglip2"


def masked_mean(tokens: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Mean of ``(B, N, D)`` tokens over the rows where ``mask`` ``(B, N)`` is set (all
    rows without a mask)."""
    if mask is None:
        return tokens.mean(dim=1)
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


def _arguments(arguments: Tuple[Any, ...]) -> Tuple[Tensor, Tensor, Tensor]:
    if len(arguments) < 3 or not all(isinstance(a, Tensor) for a in arguments[:3]):
        raise CaptureError(
            "SigLIP2 needs the padding mask and the patch grids: call "
            "attribute(pixel_values, target, additional_forward_args=(pixel_attention_mask, "
            "spatial_shapes)), as the image processor returns them."
        )
    return arguments[0], arguments[1], arguments[2]


def siglip2_layout(spatial_shapes: Tensor, mask: Tensor, n_keys: int, pooled: bool) -> PatchLayout:
    """Per-sample layout: sample ``b``'s patch ``(y, x)`` is key ``y · w_b + x``.

    ``pooled``: the differentiated attention is the MAP head's (one latent query, no
    padding queries); otherwise the mean over query rows is rescaled to the valid rows.
    """
    grids = spatial_shapes.detach().long().cpu()
    batch = grids.shape[0]
    g_h, g_w = int(grids[:, 0].max()), int(grids[:, 1].max())
    rows = torch.arange(g_h).view(1, -1, 1)
    cols = torch.arange(g_w).view(1, 1, -1)
    heights, widths = grids[:, 0].view(-1, 1, 1), grids[:, 1].view(-1, 1, 1)
    inside = (rows < heights) & (cols < widths)
    keys = torch.where(inside, rows * widths + cols, torch.full_like(rows * widths, -1))
    if bool((grids.prod(dim=1) > n_keys).any()):
        raise CaptureError(
            f"spatial_shapes {grids.tolist()} name more patches than the {n_keys} tokens of "
            "pixel_values; pass the processor's spatial_shapes unchanged."
        )
    scale = None
    if not pooled:
        valid = mask.detach().cpu().to(torch.float32).sum(dim=1).clamp(min=1)
        scale = n_keys / valid
    return PatchLayout(keys.view(batch, -1), (g_h, g_w), grids, scale)


def match(model: nn.Module) -> Optional[ViTSpec]:
    """Describe a transformers SigLIP2 model; ``None`` for anything else."""
    classification = is_instance_of(model, _MODULE, "Siglip2ForImageClassification")
    if not classification and not is_instance_of(
        model, _MODULE, "Siglip2Model", "Siglip2VisionModel", "Siglip2VisionTransformer"
    ):
        return None
    tower = vision_tower(model)
    vision: Any = tower
    norm: Any = vision.post_layernorm
    pool: Optional[nn.Module] = None
    if not classification:
        head = getattr(vision, "head", None)
        if isinstance(head, nn.Module) and getattr(vision, "use_head", True):
            pool = head

    if classification:
        classifier: Any = model.classifier

        def model_readout(tokens: Tensor, mask: Optional[Tensor] = None) -> Tensor:
            return classifier(masked_mean(norm(tokens), mask))

        def mean_readout(tokens: Tensor, mask: Optional[Tensor] = None) -> Tensor:
            return classifier(norm(masked_mean(tokens, mask)))

    elif pool is not None:
        head_module: Any = pool

        def model_readout(tokens: Tensor, mask: Optional[Tensor] = None) -> Tensor:
            return head_module(norm(tokens), mask)

        mean_readout = model_readout  # an attention pool has no mean-pooled variant

    else:

        def model_readout(tokens: Tensor, mask: Optional[Tensor] = None) -> Tensor:
            return masked_mean(norm(tokens), mask)

        def mean_readout(tokens: Tensor, mask: Optional[Tensor] = None) -> Tensor:
            return norm(masked_mean(tokens, mask))

    def readout_inputs(arguments: Tuple[Any, ...]) -> Tuple[Any, ...]:
        return (_arguments(arguments)[1],)

    def layout(arguments: Tuple[Any, ...], n_keys: int) -> PatchLayout:
        _, mask, spatial_shapes = _arguments(arguments)
        return siglip2_layout(spatial_shapes, mask, n_keys, pooled=pool is not None)

    blocks = layers_of(tower)
    patch_size = pair(vision.embeddings.patch_size)
    return ViTSpec(
        family="hf",
        root=tower,
        blocks=blocks,
        attentions=tuple(attention_of(block, "self_attn") for block in blocks),
        readout=None if pool is not None else mean_readout,
        model_readout=model_readout,
        num_prefix_tokens=0,
        patch_size=patch_size,
        grid=floor_grid(patch_size),
        pool_attention=pool,
        image_forward=image_features_forward(model),
        token_input=TokenInput("hidden_states"),
        layout=layout,
        readout_inputs=readout_inputs,
        patch_inputs=True,
    )
