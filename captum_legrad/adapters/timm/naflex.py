"""timm ``NaFlexVit`` (``naflexvit_*``, SigLIP2-style variable patch grids; timm >= 1.0.16).

Two input forms, one spec:

* images ``(B, C, H, W)``: one grid for the batch, as for any timm ViT;
* timm's NaFlex patch dictionary ``{"patches", "patch_coord", "patch_valid"}`` (what
  timm's NaFlex loader yields), passed the Captum way: ``attribute(patches, target,
  additional_forward_args=(patch_coord, patch_valid))`` (:func:`naflex_arguments` splits a
  dictionary). ``NaFlexVit.forward(x, patch_coord, patch_valid)`` takes exactly these, so no
  wrapper is needed. Each sample's grid is ``max(patch_coord) + 1`` over its valid patches;
  patch ``i`` at ``(y, x)`` is key ``P + i`` (the attention pool, which sees no prefix
  tokens: key ``i``); padding keys never appear.

Readouts pool only the valid tokens, as the model does: ``pooling="model"`` is
``forward_head(norm(Z), patch_valid=...)``; ``pooling="mean"`` the mean over the prefix
and valid patch tokens, then ``norm``, ``fc_norm`` and ``head``. ``global_pool="map"``
models are differentiated through their attention pool.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ...errors import CaptureError
from ...spec import PatchLayout, TokenInput, ViTSpec
from ..common import pair

__all__ = ["match", "naflex_arguments", "naflex_layout"]


def naflex_arguments(batch: Dict[str, Tensor]) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """``(inputs, additional_forward_args)`` for LeGrad from timm's NaFlex dictionary.

    Examples::

        >>> patches, extra = naflex_arguments(batch)
        >>> maps = LeGrad(model).attribute(patches, target=3, additional_forward_args=extra)
    """
    missing = [k for k in ("patches", "patch_coord", "patch_valid") if k not in batch]
    if missing:
        raise ValueError(f"The NaFlex dictionary lacks {missing}; timm's NaFlex loader gives them.")
    return batch["patches"], (batch["patch_coord"], batch["patch_valid"])


def _naflex_class() -> Optional[type]:
    try:
        from timm.models.naflexvit import NaFlexVit
    except ImportError:  # timm < 1.0.16
        return None
    return NaFlexVit


def naflex_layout(
    patch_coord: Tensor, patch_valid: Tensor, offset: int, n_keys: int, scale_rows: bool
) -> PatchLayout:
    """Per-sample layout of a NaFlex patch batch.

    ``offset``: the key of patch row 0. ``scale_rows``: the differentiated attention has
    one query row per token (padding ones included), so the query mean is rescaled to the
    sample's valid rows (``n_keys / valid tokens``).
    """
    coord = patch_coord.detach().long().cpu()
    valid = patch_valid.detach().bool().cpu()
    if coord.dim() != 3 or coord.shape[-1] != 2 or valid.shape != coord.shape[:2]:
        raise CaptureError(
            f"patch_coord must be (B, N, 2) and patch_valid (B, N); got "
            f"{tuple(coord.shape)} and {tuple(valid.shape)}."
        )
    batch, n_rows = valid.shape
    if not bool(valid.any(dim=1).all()):
        raise CaptureError(
            "A sample has no valid patch (patch_valid all False): nothing to explain."
        )
    masked = coord.masked_fill(~valid.unsqueeze(-1), -1)
    grids = masked.amax(dim=1) + 1  # (B, 2)
    g_h, g_w = int(grids[:, 0].max()), int(grids[:, 1].max())
    keys = torch.full((batch, g_h * g_w), -1, dtype=torch.long)
    b_idx, r_idx = valid.nonzero(as_tuple=True)
    cells = coord[b_idx, r_idx, 0] * g_w + coord[b_idx, r_idx, 1]
    keys[b_idx, cells] = offset + r_idx
    scale = None
    if scale_rows:
        scale = n_keys / (valid.sum(dim=1).to(torch.float32) + (n_keys - n_rows))
    return PatchLayout(keys, (g_h, g_w), grids, scale, row_offset=offset)


def match(model: nn.Module) -> Optional[ViTSpec]:
    """Describe a timm ``NaFlexVit``; ``None`` for anything else."""
    naflex = _naflex_class()
    if naflex is None or not isinstance(model, naflex):
        return None
    vit: Any = model
    embeds = vit.embeds
    patch_size = pair(embeds.patch_size)
    blocks = tuple(vit.blocks)
    attentions = tuple(getattr(block, "attn", block) for block in blocks)
    attn_pool: Optional[nn.Module] = getattr(vit, "attn_pool", None)
    n_prefix = int(vit.num_prefix_tokens)

    def grid(height: int, width: int) -> Tuple[int, int]:
        g_h, g_w = embeds.dynamic_feat_size((height, width))
        return int(g_h), int(g_w)

    def model_readout(tokens: Tensor, patch_valid: Optional[Tensor] = None) -> Tensor:
        return vit.forward_head(vit.norm(tokens), patch_valid=patch_valid)

    def mean_readout(tokens: Tensor, patch_valid: Optional[Tensor] = None) -> Tensor:
        if patch_valid is None:
            pooled = tokens.mean(dim=1)
        else:
            prefix = patch_valid.new_ones((patch_valid.shape[0], n_prefix), dtype=torch.bool)
            weights = torch.cat([prefix, patch_valid.bool()], dim=1).to(tokens.dtype)
            weights = weights.unsqueeze(-1)
            pooled = (tokens * weights).sum(dim=1) / weights.sum(dim=1)
        return vit.head(vit.head_drop(vit.fc_norm(vit.norm(pooled))))

    def naflex_mode(arguments: Tuple[Any, ...]) -> bool:
        first = arguments[0] if arguments else None
        return isinstance(first, Tensor) and first.dim() != 4

    def readout_inputs(arguments: Tuple[Any, ...]) -> Tuple[Any, ...]:
        if naflex_mode(arguments) and len(arguments) > 2:
            return (arguments[2],)
        return ()

    def layout(arguments: Tuple[Any, ...], n_keys: int) -> PatchLayout:
        first = arguments[0]
        if not naflex_mode(arguments):
            g_h, g_w = grid(first.shape[-2], first.shape[-1])
            offset = n_keys - g_h * g_w
            if offset not in (0, n_prefix):
                raise CaptureError(
                    f"The attention has {n_keys} keys but the patch grid is {g_h}x{g_w} with "
                    f"{n_prefix} prefix tokens."
                )
            return PatchLayout(torch.arange(offset, n_keys), (g_h, g_w))
        if len(arguments) < 3 or not all(isinstance(a, Tensor) for a in arguments[1:3]):
            raise CaptureError(
                "NaFlexVit patch input needs its coordinates and validity: call "
                "attribute(patches, target, additional_forward_args=(patch_coord, patch_valid)) "
                "(captum_legrad.adapters.timm.naflex.naflex_arguments splits timm's dictionary)."
            )
        offset = n_keys - first.shape[1]
        if offset not in (0, n_prefix):
            raise CaptureError(
                f"The attention has {n_keys} keys for {first.shape[1]} patch rows and "
                f"{n_prefix} prefix tokens."
            )
        return naflex_layout(
            arguments[1], arguments[2], offset, n_keys, scale_rows=attn_pool is None
        )

    return ViTSpec(
        family="timm",
        root=vit,
        blocks=blocks,
        attentions=attentions,
        readout=None if attn_pool is not None else mean_readout,
        model_readout=model_readout,
        num_prefix_tokens=n_prefix,
        patch_size=patch_size,
        grid=grid,
        pool_attention=attn_pool,
        token_input=TokenInput("x"),
        layout=layout,
        readout_inputs=readout_inputs,
        patch_inputs=True,
    )
