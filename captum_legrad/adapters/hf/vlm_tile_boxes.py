"""Image tokens of tiled VLMs → views → rectangles of the original image.

A *view* is one token grid a model emits for an image: a tile, the thumbnail or global
view, or the whole image. :class:`TileView` says which sequence positions hold its tokens
(row-major on its grid) and which rectangle of the **original** image it covers. The
per-family rules (InternVL, Gemma 4, Llama 4) live in their modules; this one holds what
they share: runs of a token in a row of ``input_ids`` and the rectangle arithmetic.
"""

from __future__ import annotations

from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["TileView", "runs", "image_size_of", "tile_boxes", "sample_views"]


class TileView(NamedTuple):
    """One view of one image.

    Attributes:
        image: The image's index among all images of the batch, in the processor's order
            (row-major over samples, then in order within a sample).
        positions: ``(g_h·g_w,)`` sequence positions of the view's tokens, row-major on
            ``grid``.
        grid: ``(g_h, g_w)`` the view's token grid.
        box: ``(top, left, bottom, right)`` the rectangle of the original image (pixels,
            floats) the grid covers; cells split it evenly. It may reach past the image by
            less than one cell where the model's canvas was padded (the cell is partly
            padding).
        kind: ``"tile"``, ``"global"`` (a downscaled whole image beside tiles) or
            ``"image"`` (the image's only view).
    """

    image: int
    positions: Tensor
    grid: Tuple[int, int]
    box: Tuple[float, float, float, float]
    kind: str


def runs(row: Tensor, token_id: int) -> List[Tuple[int, int]]:
    """``(start, end)`` of every maximal run of ``token_id`` in the 1-d ``row``."""
    hit = (row == token_id).long()
    if not bool(hit.any()):
        return []
    padded = torch.cat([hit.new_zeros(1), hit, hit.new_zeros(1)])
    edges = torch.diff(padded)
    starts = torch.nonzero(edges == 1)[:, 0].tolist()
    ends = torch.nonzero(edges == -1)[:, 0].tolist()
    return list(zip(starts, ends))


def image_size_of(
    image_sizes: Optional[Sequence[Sequence[int]]], index: int, family: str, why: str
) -> Tuple[int, int]:
    """The original ``(H, W)`` of image ``index``; a clear error when it is not given."""
    if image_sizes is None:
        raise ValueError(
            f"{family} needs each image's original size to map its tokens back to the "
            f"image ({why}): pass image_sizes=[(height, width), ...], one row per image in "
            "the processor's order (explain_answer passes it)."
        )
    if index >= len(image_sizes):
        raise ValueError(
            f"image_sizes has {len(image_sizes)} rows but the prompts hold more images; "
            "give one (height, width) row per image."
        )
    size = image_sizes[index]
    return int(size[0]), int(size[1])


def tile_boxes(
    rows: int, cols: int, height: float, width: float
) -> List[Tuple[float, float, float, float]]:
    """The rectangles of a ``rows × cols`` split of a ``height × width`` image, row-major."""
    return [
        (r * height / rows, c * width / cols, (r + 1) * height / rows, (c + 1) * width / cols)
        for r in range(rows)
        for c in range(cols)
    ]


def _names(views: Sequence[TileView]) -> List[str]:
    """``"tile r,c"``-free names: ``"tile k"`` in order, ``"global"``, ``"image"``."""
    out, k = [], 0
    for view in views:
        if view.kind == "tile":
            out.append(f"tile {k}")
            k += 1
        else:
            out.append(view.kind)
    return out


def sample_views(
    per_sample: Sequence[Sequence[TileView]], sizes: Sequence[Tuple[int, int]]
) -> List[Any]:
    """:class:`TileView` lists → :class:`~captum_legrad.views.SampleViews`, one per sample:
    every image a source of its original size ``sizes[image]``, boxes rounded to pixels."""
    from ...views import SampleViews, Source, View

    out = []
    for views in per_sample:
        images = sorted({view.image for view in views})
        local = {image: k for k, image in enumerate(images)}
        sources = tuple(Source("image", tuple(sizes[image])) for image in images)
        made = []
        for view, name in zip(views, _names(views)):
            top, left, bottom, right = (round(v) for v in view.box)
            made.append(
                View(view.positions.cpu(), view.grid, local[view.image], (top, left, bottom, right),
                     None, name)
            )  # fmt: skip
        out.append(SampleViews(sources, tuple(made)))
    return out
