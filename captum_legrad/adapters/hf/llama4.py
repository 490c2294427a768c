"""Llama 4 (``Llama4ForConditionalGeneration``): tiles of a padded canvas plus a global view.

The image processor (``Llama4ImageProcessor``) picks a canvas of ``rows × cols`` tiles of
``T × T`` (``get_best_fit``), resizes the image **without distortion** to ``n_h × n_w``
inside it (by default never upscaling past ``max(side, T)``), pads the bottom and right,
and cuts the canvas into tiles, row-major; with more than one tile it appends the global
view, the whole image resized to ``T × T``. Each tile's vision patches (CLS dropped) are
pixel-shuffled ``2 × 2`` (``pixel_shuffle_ratio = 0.5``) into a ``T/p/2`` square grid,
row-major. The prompt is ``<|image_start|>``, then per row of tiles each tile's
``<|patch|>`` tokens separated by ``<|tile_x_separator|>`` and the row closed by
``<|tile_y_separator|>``, then ``<|image|>`` and the global view's ``<|patch|>`` tokens,
then ``<|image_end|>``; a one-tile image is ``<|image_start|><|image|>`` + patches +
``<|image_end|>``. Only ``<|patch|>`` (``config.image_token_id``) receives image features;
the separators stay text tokens and are left out of the maps.

The arrangement is read from the separators; the padding needs the image's original size
(``image_sizes``): token rows and columns that lie wholly in the padding are dropped.
"""

from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Tuple

from torch import Tensor

from .tiles import TileView, image_size_of, runs

__all__ = ["tokens_per_tile", "content_size", "views"]


def tokens_per_tile(config: Any) -> Tuple[int, int]:
    """One tile's token grid: vision patches per side times ``pixel_shuffle_ratio``."""
    vision = config.vision_config
    side = int(vision.image_size) // int(vision.patch_size)
    merged = round(side * float(vision.pixel_shuffle_ratio))
    return merged, merged


def content_size(
    height: int, width: int, canvas: Tuple[int, int], tile: int, resize_to_max_canvas: bool = False
) -> Tuple[int, int]:
    """The size ``(n_h, n_w)`` the processor resizes an ``height × width`` image to inside
    its ``canvas`` (``get_max_res_without_distortion``); the rest is padding."""
    if resize_to_max_canvas:
        target = canvas
    else:
        target = (min(max(height, tile), canvas[0]), min(max(width, tile), canvas[1]))
    scale_w = target[1] / width
    scale_h = target[0] / height
    if scale_w < scale_h:
        new = (min(math.floor(height * scale_w), target[0]), target[1])
    else:
        new = (target[0], min(math.floor(width * scale_h), target[1]))
    return max(new[0], 1), max(new[1], 1)


def _cropped(
    start: int,
    grid: Tuple[int, int],
    origin: Tuple[int, int],
    tile: int,
    content: Tuple[int, int],
    scale: Tuple[float, float],
    row: Tensor,
    image: int,
    kind: str,
) -> Optional[TileView]:
    """One tile's view without the token rows/columns that lie wholly in the padding."""
    cell = (tile / grid[0], tile / grid[1])
    keep_h = min(grid[0], math.ceil((content[0] - origin[0]) / cell[0]))
    keep_w = min(grid[1], math.ceil((content[1] - origin[1]) / cell[1]))
    if keep_h <= 0 or keep_w <= 0:
        return None
    index = [start + i * grid[1] + j for i in range(keep_h) for j in range(keep_w)]
    box = (
        origin[0] * scale[0],
        origin[1] * scale[1],
        (origin[0] + keep_h * cell[0]) * scale[0],
        (origin[1] + keep_w * cell[1]) * scale[1],
    )
    return TileView(image, row.new_tensor(index), (keep_h, keep_w), box, kind)


def views(
    input_ids: Tensor,
    image_token_id: int,
    boi_token_id: int,
    eoi_token_id: int,
    grid: Tuple[int, int],
    tile: int,
    image_sizes: Optional[Sequence[Sequence[int]]],
    resize_to_max_canvas: bool = False,
) -> List[List[TileView]]:
    """Each sample's views: every image's tiles (row-major, padding dropped) and global view.

    Args:
        input_ids: ``(B, S)`` prompts as the processor built them.
        image_token_id: ``<|patch|>``'s id (``config.image_token_id``).
        boi_token_id: ``<|image_start|>`` (``config.boi_token_id``).
        eoi_token_id: ``<|image_end|>`` (``config.eoi_token_id``).
        grid: One tile's token grid (:func:`tokens_per_tile`).
        tile: The tile side ``T`` in pixels (the vision tower's image size).
        image_sizes: The original ``(H, W)`` of every image, in order (required: the
            padding depends on it).
        resize_to_max_canvas: The image processor's option of that name.
    """
    per_tile = grid[0] * grid[1]
    out: List[List[TileView]] = []
    image = 0
    for row in input_ids:
        sample: List[TileView] = []
        starts = (row == boi_token_id).nonzero()[:, 0].tolist()
        ends = (row == eoi_token_id).nonzero()[:, 0].tolist()
        if len(starts) != len(ends):
            raise ValueError(
                "A Llama 4 prompt has unbalanced <|image_start|>/<|image_end|> tokens: build "
                "input_ids with the model's processor."
            )
        for first, last in zip(starts, ends):
            segment = row[first : last + 1]
            patches = [(first + a, first + b) for a, b in runs(segment, image_token_id)]
            if not patches or any(b - a != per_tile for a, b in patches):
                raise ValueError(
                    f"A Llama 4 image's <|patch|> runs are {[b - a for a, b in patches]} tokens, "
                    f"not {per_tile} per tile: build input_ids with the model's processor."
                )
            h, w = image_size_of(image_sizes, image, "Llama 4", "its canvas is padded")
            tiles = len(patches) - 1 if len(patches) > 1 else 1
            if len(patches) == 1:
                rows, cols = 1, 1
            else:
                # The global view follows <|tile_y_separator|> <|image|>: the first token
                # of that gap is the row separator; count the rows by it.
                y_sep = int(row[patches[-2][1]])
                rows = sum(int(row[b]) == y_sep for a, b in patches[:-1])
                if rows == 0 or tiles % rows:
                    raise ValueError(
                        "Cannot read the tile rows of a Llama 4 image from its separators: "
                        "build input_ids with the model's processor."
                    )
                cols = tiles // rows
            canvas = (rows * tile, cols * tile)
            content = content_size(h, w, canvas, tile, resize_to_max_canvas)
            scale = (h / content[0], w / content[1])
            for k in range(tiles):
                r, c = divmod(k, cols)
                view = _cropped(
                    patches[k][0], grid, (r * tile, c * tile), tile, content, scale, row,
                    image, "tile" if len(patches) > 1 else "image",
                )  # fmt: skip
                if view is not None:
                    sample.append(view)
            if len(patches) > 1:
                a, b = patches[-1]
                positions = row.new_tensor(range(a, b))
                sample.append(
                    TileView(image, positions, grid, (0.0, 0.0, float(h), float(w)), "global")
                )
            image += 1
        out.append(sample)
    return out
