"""From grid maps to what a caller asked for: aggregation, upsampling, normalisation and
the output forms, written once for LeGrad and the baselines.

The computation (:mod:`.compute`) gives maps on the patch grid, ``(B, K, g_h, g_w)`` per
target (or per layer). :func:`finish` turns them into the requested ``output``:

* ``"grid"``: the patch grid itself;
* ``"map"``: upsampled to the input's size ``(B, K, H, W)``;
* ``"input"``: the input's own shape, the map repeated over its channels (``(B, C, H,
  W)`` for one target, ``(B, K, C, H, W)`` for several), or for patch-sequence inputs
  (NaFlex) the sequence's form ``(B, N, p·p·C)``.

With per-sample grids (a :class:`~captum_legrad.spec.PatchLayout` with ``grids``) every
sample is upsampled to its own size ``grid · patch_size`` and normalised over its own
pixels; the batch is padded to its largest size with zeros (``docs/design.md``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..spec import PatchLayout

__all__ = [
    "aggregate_layers",
    "upsample",
    "upsample_each",
    "minmax_normalize",
    "grid_mask",
    "patch_rows",
    "empty_prompt_correction",
    "empty_maps",
    "finish",
]


def aggregate_layers(maps: Tensor) -> Tensor:
    """Sum per-layer maps ``(B, K, L, g_h, g_w)`` over layers (``docs/method.md``, step 5)."""
    return maps.sum(dim=2)


def upsample(maps: Tensor, size: Tuple[int, int], mode: str = "bilinear") -> Tensor:
    """Resize ``(B, K, g_h, g_w)`` maps to ``size`` (``align_corners=False`` for linear modes)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    align: Optional[bool] = False if mode in ("bilinear", "bicubic", "linear") else None
    return F.interpolate(maps, size=size, mode=mode, align_corners=align)


def minmax_normalize(maps: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """``(E - min) / (max - min)`` over the last two dims; all zeros where ``max == min``.

    No epsilon: maps of random or LayerScale models can be 1e-7 in scale. ``valid``
    (broadcastable to ``maps``, boolean): only these pixels count for min and max, the
    others are zero in the result (per-sample sizes padded to the batch's largest).
    """
    flat = maps.flatten(start_dim=-2)
    if valid is None:
        low = flat.min(dim=-1, keepdim=True).values
        high = flat.max(dim=-1, keepdim=True).values
    else:
        keep = valid.expand_as(maps).flatten(start_dim=-2)
        low = flat.masked_fill(~keep, float("inf")).min(dim=-1, keepdim=True).values
        high = flat.masked_fill(~keep, float("-inf")).max(dim=-1, keepdim=True).values
        low = torch.where(keep.any(dim=-1, keepdim=True), low, torch.zeros_like(low))
        high = torch.where(keep.any(dim=-1, keepdim=True), high, torch.zeros_like(high))
    span = high - low
    safe = torch.where(span > 0, span, torch.ones_like(span))
    out = torch.where(span > 0, (flat - low) / safe, torch.zeros_like(flat))
    if valid is not None:
        out = out.masked_fill(~keep, 0.0)
    return out.view_as(maps)


def upsample_each(
    maps: Tensor, grids: Tensor, patch_size: Tuple[int, int], mode: str = "bilinear"
) -> Tuple[Tensor, Tensor]:
    """Per-sample grids → per-sample image sizes, padded to the batch's largest.

    ``maps`` (B, K, g_h, g_w) hold sample ``b``'s map in the top-left ``grids[b]`` corner;
    each is upsampled to its own size ``grids[b] · patch_size`` and placed top-left in
    ``(B, K, H_max, W_max)`` zeros. Returns the maps and the boolean ``(B, 1, H_max, W_max)``
    mask of each sample's own pixels.
    """
    sizes = grids.cpu().long() * torch.tensor(patch_size, dtype=torch.long)
    height, width = int(sizes[:, 0].max()), int(sizes[:, 1].max())
    out = maps.new_zeros((maps.shape[0], maps.shape[1], height, width))
    valid = torch.zeros((maps.shape[0], 1, height, width), dtype=torch.bool, device=maps.device)
    for b, ((g_h, g_w), (h, w)) in enumerate(zip(grids.tolist(), sizes.tolist())):
        own = maps[b : b + 1, :, :g_h, :g_w]
        out[b, :, :h, :w] = upsample(own, (h, w), mode)[0]
        valid[b, :, :h, :w] = True
    return out, valid


def patch_rows(
    maps: Tensor, layout: PatchLayout, patches: Tensor, patch_size: Tuple[int, int]
) -> Tensor:
    """Image-space maps ``(B, K, H, W)`` → the patch sequence's form ``(B, K, N, D)``.

    Row ``r`` of sample ``b`` (key ``layout.row_offset + r``) gets the pixels of its patch
    in ``(p_h, p_w, C)`` order, the map repeated over the ``C`` channels; padding rows are
    zero.
    """
    p_h, p_w = patch_size
    batch, n_rows, width = patches.shape
    if width % (p_h * p_w):
        raise ValueError(
            f"A patch row has {width} values, not a multiple of the patch size {p_h}x{p_w}: "
            'use output="map" for this input.'
        )
    channels = width // (p_h * p_w)
    out = maps.new_zeros((batch, maps.shape[1], n_rows, width))
    g_max = layout.grid
    keys = layout.keys.view(-1, *g_max) if layout.keys.dim() == 2 else None
    for b, (g_h, g_w) in enumerate(layout.sample_grids(batch).tolist()):
        own = maps[b, :, : g_h * p_h, : g_w * p_w]
        own = own.unflatten(-1, (g_w, p_w)).unflatten(-3, (g_h, p_h))
        pixels = own.permute(0, 1, 3, 2, 4).reshape(maps.shape[1], g_h * g_w, p_h * p_w, 1)
        pixels = pixels.expand(-1, -1, -1, channels).flatten(-2)  # (K, n, p_h·p_w·C)
        cells = (keys[b, :g_h, :g_w] if keys is not None else layout.keys.view(g_max)).flatten()
        cells = cells.to(maps.device)
        present = cells >= 0
        rows = cells[present] - layout.row_offset
        out[b, :, rows] = pixels[:, present]
    return out


def grid_mask(grids: Tensor, grid: Tuple[int, int], device: torch.device) -> Tensor:
    """Boolean ``(B, 1, g_h, g_w)``: the cells of each sample's own grid ``grids[b]``."""
    rows = torch.arange(grid[0], device=device).view(1, -1, 1)
    cols = torch.arange(grid[1], device=device).view(1, 1, -1)
    g = grids.to(device)
    return ((rows < g[:, 0].view(-1, 1, 1)) & (cols < g[:, 1].view(-1, 1, 1))).unsqueeze(1)


def empty_prompt_correction(
    maps: Tensor, empty: Tensor, threshold: float = 0.8, valid: Optional[Tensor] = None
) -> Tensor:
    """The reference code's SigLIP "empty prompt" correction, on grid maps.

    ``maps`` (B, K, g_h, g_w) are set to zero where the min-max normalised map of the
    empty prompt, ``empty`` (B, 1, g_h, g_w), exceeds ``threshold``: patches that light up
    for any prompt (attention sinks) are suppressed. Off by default in LeGrad.
    """
    return maps.masked_fill(minmax_normalize(empty, valid) > threshold, 0.0)


def empty_maps(image: Tensor, k: int, grid: Tuple[int, int], *more: int) -> Tensor:
    """Maps for an empty batch: ``(0, k, *more, g_h, g_w)``, no grid for patch sequences
    (whose grid comes from the samples)."""
    if image.dim() != 4:
        grid = (0, 0)
    return image.new_zeros((0, k, *more, *grid))


def finish(
    maps: Tensor,
    layout: Optional[PatchLayout],
    image: Tensor,
    *,
    output: str,
    patch_size: Tuple[int, int],
    interpolate_mode: str = "bilinear",
    normalize: bool = True,
    per_target: bool = False,
) -> Tensor:
    """Grid maps ``(B, K, g_h, g_w)`` → the ``output`` form (see the module doc).

    Args:
        maps: The layer-summed maps on the patch grid.
        layout: The batch's layout with per-sample grids, or None for one grid.
        image: The input batch (its size, channels and dtype shape the result).
        output: ``"input"``, ``"map"`` or ``"grid"``.
        patch_size: ``(p_h, p_w)`` (per-sample sizes and patch rows).
        interpolate_mode: The upsampling mode.
        normalize: Min-max normalise each (sample, target) map.
        per_target: Keep the target dimension with ``output="input"`` (``(B, K, C, H,
            W)``, ``attribute_multi``); otherwise the one target's map fills ``(B, C, H, W)``.
    """
    if layout is None or layout.grids is None:
        if output != "grid":
            maps = upsample(maps, (image.shape[-2], image.shape[-1]), interpolate_mode)
        if normalize:
            maps = minmax_normalize(maps)
    else:
        if output == "grid":
            valid = grid_mask(layout.grids, layout.grid, maps.device)
        else:
            maps, valid = upsample_each(maps, layout.grids, patch_size, interpolate_mode)
        if normalize:
            maps = minmax_normalize(maps, valid)
    maps = maps.to(image.dtype)
    if output != "input":
        return maps
    if image.dim() == 3:  # a patch sequence: the map in the sequence's own form
        assert layout is not None
        rows = patch_rows(maps, layout, image, patch_size)
        return rows if per_target else rows[:, 0]
    if per_target:
        return maps.unsqueeze(2).repeat(1, 1, image.shape[1], 1, 1)
    return maps.repeat(1, image.shape[1], 1, 1)
