"""InternVL (``InternVLForConditionalGeneration``): dynamic tiles plus a thumbnail.

The image processor (``GotOcr2ImageProcessor`` with ``crop_to_patches``) picks a
``cols × rows`` arrangement whose aspect ratio is closest to the image's, resizes (stretches)
the whole image to ``rows·T × cols·T`` and cuts it into ``T × T`` tiles, row-major; with
more than one tile it appends a thumbnail: the whole image resized to ``T × T``. Every
tile is encoded alone; the vision patches (``T/p`` per side, CLS dropped) are merged
``2 × 2`` by the pixel shuffle (``downsample_ratio = 0.5``): token ``(i, j)`` of a tile is
its patches ``(2i…2i+1, 2j…2j+1)``, so a tile is a ``T/p·r × T/p·r`` token grid in
row-major order. The processor writes ``<img>`` + ``<IMG_CONTEXT>`` × (tokens per tile ×
tiles) + ``</img>``: one run of image tokens per image, tiles in order, thumbnail last.

The processor returns neither the arrangement nor the image size; the arrangement is
recovered from the tile count and the image's original size (``image_sizes``), by the
processor's own rule restricted to that count.
"""

from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ...errors import UnsupportedModelError
from .vlm_tiles import (
    ImageView,
    as_samples,
    check_image_count,
    image_size_of,
    runs,
    tile_boxes,
)

__all__ = ["CLASSES", "tokens_per_tile", "arrangement", "views", "rules", "token_step"]


def tokens_per_tile(config: Any) -> Tuple[int, int]:
    """The token grid of one tile: vision patches per side times ``downsample_ratio``."""
    vision = config.vision_config
    size = vision.image_size
    patch = vision.patch_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
    ratio = float(config.downsample_ratio)
    return round(size[0] // patch[0] * ratio), round(size[1] // patch[1] * ratio)


def arrangement(tiles: int, height: int, width: int, tile: Tuple[int, int]) -> Tuple[int, int]:
    """``(rows, cols)`` with ``rows · cols = tiles`` the image processor chooses for an
    ``height × width`` image (``get_optimal_tiled_canvas``: the closest aspect ratio; on a
    tie the later candidate while the tiles cover less than twice the image)."""
    aspect = width / height
    area = width * height
    best: Optional[Tuple[int, int]] = None
    best_diff = float("inf")
    for cols in range(1, tiles + 1):  # the processor's order: width-major
        if tiles % cols:
            continue
        rows = tiles // cols
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (rows, cols)
        elif diff == best_diff and area > 0.5 * tile[0] * tile[1] * tiles:
            best = (rows, cols)
    assert best is not None
    return best


def views(
    input_ids: Tensor,
    image_token_id: int,
    grid: Tuple[int, int],
    tile: Tuple[int, int],
    image_sizes: Optional[Sequence[Sequence[int]]] = None,
) -> List[List[ImageView]]:
    """Each sample's views: the tiles (row-major) and the thumbnail of every image.

    Args:
        input_ids: ``(B, S)`` prompts as the processor built them.
        image_token_id: ``<IMG_CONTEXT>``'s id (``config.image_token_id``).
        grid: One tile's token grid (:func:`tokens_per_tile`).
        tile: The tile size ``(T_h, T_w)`` in pixels (the vision tower's image size).
        image_sizes: The original ``(H, W)`` of every image, in order. Needed when an image
            has several tiles (their arrangement depends on it); None maps a one-tile
            image onto its tile.

    Returns:
        Per sample, the views in sequence order.
    """
    per_tile = grid[0] * grid[1]
    out: List[List[ImageView]] = []
    image = 0
    for row in input_ids:
        sample: List[ImageView] = []
        for start, end in runs(row, image_token_id):
            count = end - start
            if count % per_tile:
                raise ValueError(
                    f"An InternVL image has {count} image tokens, not a multiple of the "
                    f"{per_tile} tokens of one tile: build input_ids with the model's processor."
                )
            n = count // per_tile
            if n == 1:
                size = tile
                if image_sizes is not None:
                    size = image_size_of(image_sizes, image, "InternVL", "")
                box = (0.0, 0.0, float(size[0]), float(size[1]))
                positions = row.new_tensor(range(start, end))
                sample.append(ImageView(image, positions, grid, box, size, "image"))
                image += 1
                continue
            h, w = image_size_of(
                image_sizes, image, "InternVL", f"its {n - 1} tiles' arrangement depends on it"
            )
            rows, cols = arrangement(n - 1, h, w, tile)
            boxes = [*tile_boxes(rows, cols, float(h), float(w)), (0.0, 0.0, float(h), float(w))]
            for k, box in enumerate(boxes):
                first = start + k * per_tile
                positions = row.new_tensor(range(first, first + per_tile))
                kind = "global" if k == n - 1 else "tile"
                sample.append(ImageView(image, positions, grid, box, (h, w), kind))
            image += 1
        out.append(sample)
    return out


#: The classes this module describes.
CLASSES = ("InternVLForConditionalGeneration",)


def _sizes(value: Any) -> Optional[List[Tuple[int, int]]]:
    if value is None:
        return None
    rows = torch.as_tensor(value).view(-1, 2).tolist()
    return [(int(h), int(w)) for h, w in rows]


def rules(config: Any) -> Any:
    """InternVL's :class:`~captum_legrad.views.ViewRules`: tiles and thumbnail of every
    image (``image_sizes``, the original ``(H, W)`` per image, is read here and not passed
    to the model: its processor does not return it)."""
    from ...views import ViewRules

    vision = config.vision_config
    if getattr(config, "vision_feature_select_strategy", "default") != "default":
        raise UnsupportedModelError(
            "InternVL with vision_feature_select_strategy="
            f"{config.vision_feature_select_strategy!r} keeps the CLS token, which the pixel "
            "shuffle cannot place on the patch grid; LeGrad's answer maps support 'default'."
        )
    grid = tokens_per_tile(config)
    size = vision.image_size
    tile = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    image_id = int(config.image_token_id)

    def describe(ids: Tensor, mask: Tensor, inputs: Mapping[str, Any]) -> List[Any]:
        sizes = _sizes(inputs.get("image_sizes"))
        found = views(ids.masked_fill(mask == 0, -1).cpu(), image_id, grid, tile, sizes)
        check_image_count(sizes, found)
        return as_samples(found)

    return ViewRules(
        describe=describe,
        main_input=lambda inputs: "pixel_values",
        batch_first=False,
        consumed=("image_sizes",),
    )


def token_step(config: Any) -> int:
    """The pixels one token covers per side: the tile side over :func:`tokens_per_tile`."""
    size = config.vision_config.image_size
    side = size if isinstance(size, int) else int(size[0])
    return int(side) // tokens_per_tile(config)[0]
