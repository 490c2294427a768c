"""From grid maps to what a caller asked for: aggregation, upsampling, normalisation and
the output forms, written once for LeGrad and the baselines.

The computation (:mod:`.compute`) gives maps on the patch grid, ``(B, K, *grid)`` per
target (or per layer); the grid has the rank of the input's grid axes (``(g_h, g_w)`` for
images, ``(t, g_h, g_w)`` for video, ``(f, t)`` for spectrograms,
:class:`~captum_legrad.spec.InputAxes`). :func:`finish` turns them into the requested
``output``:

* ``"grid"``: the patch grid itself;
* ``"map"``: upsampled to the sizes of the input's grid axes, in grid order (``(B, K, H,
  W)`` for images, ``(B, K, T, H, W)`` for video); patches that overlap (a stride below
  the patch size) give each input cell the mean of the patches covering it;
* ``"input"``: the input's own shape, the map repeated over its channels (``(B, C, H,
  W)`` for one target, ``(B, K, C, H, W)`` for several; ``(B, T, C, H, W)`` for HF video),
  or for patch-sequence inputs (NaFlex) the sequence's form ``(B, N, p·p·C)``.

A model whose patch keys are not one grid of its input (a vision-language model's image
tokens, :attr:`~captum_legrad.ViTSpec.map_forms`) gives its own ``"grid"`` and ``"map"``
forms and their valid cells; normalisation is then over each sample's valid cells.

With per-sample grids (a :class:`~captum_legrad.spec.PatchLayout` with ``grids``) every
sample is upsampled to its own size ``grid · patch_size`` and normalised over its own
pixels; the batch is padded to its largest size with zeros (``docs/design.md``).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..spec import IMAGE_AXES, InputAxes, MapForms, PatchLayout

__all__ = [
    "aggregate_layers",
    "upsample",
    "overlap_mean",
    "upsample_each",
    "minmax_normalize",
    "grid_mask",
    "patch_rows",
    "empty_prompt_correction",
    "empty_maps",
    "finish",
]


def aggregate_layers(maps: Tensor) -> Tensor:
    """Sum per-layer maps ``(B, K, L, *grid)`` over layers (``docs/method.md``, step 5)."""
    return maps.sum(dim=2)


#: ``interpolate_mode`` → the ``F.interpolate`` mode for grids of rank 1, 2, 3.
_MODES = {"bilinear": ("linear", "bilinear", "trilinear"), "bicubic": (None, "bicubic", None)}


def upsample(maps: Tensor, size: Sequence[int], mode: str = "bilinear") -> Tensor:
    """Resize ``(B, K, *grid)`` maps to ``size`` (``align_corners=False`` for linear modes).

    ``mode`` is named as for images; on a grid of rank 1 or 3 ``"bilinear"`` is linear or
    trilinear interpolation, and ``"bicubic"`` (defined on 2-D grids only) is refused.
    """
    size = tuple(int(s) for s in size)
    if tuple(maps.shape[2:]) == size:
        return maps
    rank = len(size)
    if mode in _MODES:
        resolved = _MODES[mode][rank - 1] if rank <= 3 else None
        if resolved is None:
            raise ValueError(f"interpolate_mode={mode!r} has no {rank}-D form; use 'bilinear'.")
        mode = resolved
    align: Optional[bool] = (
        False if mode in ("linear", "bilinear", "bicubic", "trilinear") else None
    )
    return F.interpolate(maps, size=size, mode=mode, align_corners=align)


def overlap_mean(
    maps: Tensor, size: Sequence[int], patch: Sequence[int], stride: Sequence[int]
) -> Tensor:
    """Maps on a grid of overlapping patches ``(B, K, *grid)`` → the input's cells ``(B, K,
    *size)``: each cell the mean of the patches covering it; cells no patch covers are 0.

    Patch ``i`` covers cells ``[i·stride, i·stride + patch)`` along each axis.
    """
    rank = len(size)
    conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[rank - 1]
    batch, k, *grid = maps.shape
    flat = maps.reshape(batch * k, 1, *grid).float()
    kernel = flat.new_ones((1, 1, *patch))
    total = conv(flat, kernel, stride=tuple(stride))
    count = conv(torch.ones_like(flat[:1]), kernel, stride=tuple(stride))
    mean = total / count.clamp(min=1)
    out = mean.new_zeros((batch * k, 1, *size))
    region = tuple(slice(0, min(a, b)) for a, b in zip(mean.shape[2:], size))
    out[(slice(None), slice(None), *region)] = mean[(slice(None), slice(None), *region)]
    return out.view(batch, k, *size).to(maps.dtype)


def minmax_normalize(maps: Tensor, valid: Optional[Tensor] = None, dims: int = 2) -> Tensor:
    """``(E - min) / (max - min)`` over the last ``dims`` dims (the grid's axes: 2 for
    images, 3 for video, all frames together); all zeros where ``max == min``.

    No epsilon: maps of random or LayerScale models can be 1e-7 in scale. ``valid``
    (broadcastable to ``maps``, boolean): only these cells count for min and max, the
    others are zero in the result (per-sample sizes padded to the batch's largest).
    """
    flat = maps.flatten(start_dim=-dims)
    if valid is None:
        low = flat.min(dim=-1, keepdim=True).values
        high = flat.max(dim=-1, keepdim=True).values
    else:
        keep = valid.expand_as(maps).flatten(start_dim=-dims)
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


def grid_mask(grids: Tensor, grid: Sequence[int], device: torch.device) -> Tensor:
    """Boolean ``(B, 1, *grid)``: the cells of each sample's own grid ``grids[b]``."""
    g = grids.to(device)
    rank = len(grid)
    mask = torch.ones((g.shape[0], *grid), dtype=torch.bool, device=device)
    for axis, size in enumerate(grid):
        shape = [1] * (rank + 1)
        shape[axis + 1] = int(size)
        index = torch.arange(int(size), device=device).view(shape)
        limit = g[:, axis].view(-1, *([1] * rank))
        mask = mask & (index < limit)
    return mask.unsqueeze(1)


def empty_prompt_correction(
    maps: Tensor, empty: Tensor, threshold: float = 0.8, valid: Optional[Tensor] = None
) -> Tensor:
    """The reference code's SigLIP "empty prompt" correction, on grid maps.

    ``maps`` (B, K, g_h, g_w) are set to zero where the min-max normalised map of the
    empty prompt, ``empty`` (B, 1, g_h, g_w), exceeds ``threshold``: patches that light up
    for any prompt (attention sinks) are suppressed. Off by default in LeGrad.
    """
    return maps.masked_fill(minmax_normalize(empty, valid) > threshold, 0.0)


def empty_maps(inputs: Tensor, k: int, grid: Sequence[int], *more: int) -> Tensor:
    """Maps for an empty batch: ``(0, k, *more, *grid)`` (zeros for the grid of patch
    sequences, whose grid comes from the samples)."""
    return inputs.new_zeros((0, k, *more, *grid))


def _as_input(maps: Tensor, inputs: Tensor, axes: InputAxes, per_target: bool) -> Tensor:
    """``(B, K, *sizes)`` maps in grid order → the input's layout ``(B, K, *inputs.shape[1:])``
    (grid axes in the input's order, the map repeated over the channels), or ``(B,
    *inputs.shape[1:])`` for one target."""
    rank = len(axes.grid)
    order = sorted(range(rank), key=lambda i: axes.grid[i])
    maps = maps.permute(0, 1, *(2 + i for i in order))
    if axes.channels is not None:
        position = 2 + sum(1 for d in axes.grid if d < axes.channels)
        channels = int(inputs.shape[axes.channels])
        maps = maps.unsqueeze(position)
        repeats = [1] * maps.dim()
        repeats[position] = channels
        maps = maps.repeat(*repeats)
    return maps if per_target else maps[:, 0]


def finish(
    maps: Tensor,
    layout: Optional[PatchLayout],
    image: Tensor,
    *,
    output: str,
    patch_size: Sequence[int],
    interpolate_mode: str = "bilinear",
    normalize: bool = True,
    per_target: bool = False,
    axes: InputAxes = IMAGE_AXES,
    patch_stride: Optional[Sequence[int]] = None,
    forms: Optional[MapForms] = None,
    arguments: Tuple[Any, ...] = (),
) -> Tensor:
    """Grid maps ``(B, K, *grid)`` → the ``output`` form (see the module doc).

    Args:
        maps: The layer-summed maps on the patch grid.
        layout: The batch's layout with per-sample grids, or None for one grid.
        image: The input batch (its size, channels and dtype shape the result).
        output: ``"input"``, ``"map"`` or ``"grid"``.
        patch_size: The patch size along each grid axis (per-sample sizes, patch rows,
            overlapping patches).
        interpolate_mode: The upsampling mode.
        normalize: Min-max normalise each (sample, target) map over all its cells.
        per_target: Keep the target dimension with ``output="input"`` (``(B, K, C, H,
            W)``, ``attribute_multi``); otherwise the one target's map fills ``(B, C, H, W)``.
        axes: Where the grid and the channels are in ``image``.
        patch_stride: The step between patches where they overlap (None: they tile).
        forms: The model's own output forms (:class:`~captum_legrad.spec.MapForms`), or
            None.
        arguments: The forward's inputs and additional arguments, for ``forms``.
    """
    if forms is not None:
        if layout is None:
            raise ValueError("Output forms of a model without a layout rule.")
        stage = "grid" if output == "grid" else "map"
        maps, valid = forms.shape(maps, layout, arguments, stage, interpolate_mode)
        if normalize:
            maps = minmax_normalize(maps, valid, dims=maps.dim() - 2)
        maps = maps.to(image.dtype)
        if output != "input":
            return maps
        if forms.to_input is None:
            raise ValueError(
                'output="input" has no form for this model\'s input: use output="map" (or "grid").'
            )
        return forms.to_input(maps, arguments, per_target)
    rank = len(axes.grid)
    if layout is None or layout.grids is None:
        if output != "grid":
            sizes = axes.sizes(image)
            if patch_stride is not None and tuple(patch_stride) != tuple(patch_size):
                maps = overlap_mean(maps, sizes, patch_size, patch_stride)
            else:
                maps = upsample(maps, sizes, interpolate_mode)
        if normalize:
            maps = minmax_normalize(maps, dims=rank)
    else:  # per-sample grids of 2-D patch inputs (NaFlex)
        if output == "grid":
            valid = grid_mask(layout.grids, layout.grid, maps.device)
        else:
            p_h, p_w = patch_size
            maps, valid = upsample_each(maps, layout.grids, (p_h, p_w), interpolate_mode)
        if normalize:
            maps = minmax_normalize(maps, valid)
    maps = maps.to(image.dtype)
    if output != "input":
        return maps
    if image.dim() != axes.ndim:  # a patch sequence: the map in the sequence's own form
        assert layout is not None
        p_h, p_w = patch_size
        rows = patch_rows(maps, layout, image, (p_h, p_w))
        return rows if per_target else rows[:, 0]
    return _as_input(maps, image, axes, per_target)
