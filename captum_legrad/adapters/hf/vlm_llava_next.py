"""LLaVA-NeXT and LLaVA-OneVision (AnyRes): the base view and the unpadded crops.

The processor turns an image of size ``(H, W)`` (``image_sizes``) into a base view (the
whole image resized to the vision tower's square; LLaVA-OneVision's images of a
multi-image sample: the image padded to a square first) and, for single images, the
crops of a larger copy: the image resized to fit the best of ``image_grid_pinpoints``
(aspect kept), centred on that canvas with padding, cut into ``n_h × n_w`` crops. The
model (``pack_image_features``) lays the crops' patch grids side by side into one
``(n_h·P) × (n_w·P)`` grid, cuts the rows or columns of the padding (``unpad_image``),
LLaVA-OneVision shrinks it bilinearly when it exceeds ``anyres_max_N`` crops, and appends
``image_newline`` after every row. The image's tokens are the base view's ``P × P``, then
the crop grid row by row, each row followed by a newline token (OneVision's multi-image
images: the base view and one newline).

So an image has two views: ``"base"`` over the whole image and ``"crops"`` over the
unpadded grid, whose rectangle is where the kept rows and columns lie in the original
image (up to a fraction of a cell beyond it, where the padding cut is not whole cells).
"""

from __future__ import annotations

import math
from typing import Any, List, Mapping, Optional, Sequence, Tuple

from torch import Tensor

from ...views import SampleViews, ViewRules
from .vlm_tiles import (
    ImageView,
    as_samples,
    flat_ints,
    in_pixels,
    padding_out,
    resample_box,
    size_rows,
    split_images,
)

__all__ = [
    "CLASSES", "anyres_views", "crop_layout", "anyres_rules", "frame_boxes", "rules", "token_step",
]  # fmt: skip


def _best_resolution(size: Tuple[int, int], pinpoints: Sequence[Sequence[int]]) -> Tuple[int, int]:
    """transformers' ``select_best_resolution``: the pinpoint ``(h, w)`` that keeps the most
    of the image and wastes the least canvas."""
    height, width = size
    best: Optional[Tuple[int, int]] = None
    most, least = 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        wasted = w * h - kept
        if kept > most or (kept == most and wasted < least):
            most, least, best = kept, wasted, (int(h), int(w))
    assert best is not None
    return best


def _resized(size: Tuple[int, int], target: Tuple[int, int]) -> Tuple[int, int]:
    """transformers' ``get_patch_output_size``: the image's size inside the canvas."""
    height, width = size
    t_h, t_w = target
    scale_w, scale_h = t_w / width, t_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), t_h), t_w
    return t_h, min(math.ceil(width * scale_h), t_w)


def crop_layout(
    size: Tuple[int, int],
    pinpoints: Sequence[Sequence[int]],
    crop: int,
    patch: int,
    max_crops: Optional[int] = None,
) -> Tuple[Tuple[int, int], Tuple[float, float, float, float]]:
    """The unpadded crop grid of an image and the rectangle it covers.

    Args:
        size: The original image's ``(H, W)``.
        pinpoints: The model's ``image_grid_pinpoints`` (``(h, w)`` canvases).
        crop: The vision tower's input side (``vision_config.image_size``).
        patch: The vision tower's patch size.
        max_crops: LLaVA-OneVision's ``anyres_max_N``: the grid is shrunk to about ``N``
            crops' worth of cells when it is more than 1.1 times that; None for LLaVA-NeXT.

    Returns:
        ``((g_h, g_w), (top, left, bottom, right))``: the grid of crop tokens (without the
        newline column) and the rectangle of the original image it covers, as fractions.
    """
    height, width = int(size[0]), int(size[1])
    best = _best_resolution((height, width), pinpoints)
    cells = crop // patch
    rows, cols = (best[0] // crop) * cells, (best[1] // crop) * cells
    # unpad_image, on the feature grid.
    top, bottom, left, right = 0, rows, 0, cols
    if width / height > cols / rows:
        kept = int(round(height * (cols / width), 7))
        pad = (rows - kept) // 2
        top, bottom = pad, rows - pad
    else:
        kept = int(round(width * (rows / height), 7))
        pad = (cols - kept) // 2
        left, right = pad, cols - pad
    grid = (bottom - top, right - left)
    if max_crops is not None:
        ratio = math.sqrt(grid[0] * grid[1] / (max_crops * cells**2))
        if ratio > 1.1:  # bilinear shrinking keeps the grid's extent
            grid = (int(grid[0] // ratio), int(grid[1] // ratio))
    # The canvas (best) in pixels; the image sits centred in it at its resized size.
    new_h, new_w = _resized((height, width), best)
    paste_y, paste_x = (best[0] - new_h) // 2, (best[1] - new_w) // 2
    pixel = (best[0] / rows, best[1] / cols)  # canvas pixels per grid cell
    box = (
        (top * pixel[0] - paste_y) / new_h,
        (left * pixel[1] - paste_x) / new_w,
        (bottom * pixel[0] - paste_y) / new_h,
        (right * pixel[1] - paste_x) / new_w,
    )
    return grid, box


def _square_box(size: Tuple[int, int]) -> Tuple[float, float, float, float]:
    """The rectangle of an image padded to a square (OneVision's multi-image images)."""
    height, width = size
    side = max(height, width)
    y, x = (side - height) // 2, (side - width) // 2
    return (-y / height, -x / width, (side - y) / height, (side - x) / width)


def anyres_views(
    input_ids: Tensor,
    config: Any,
    image_sizes: Any,
    *,
    onevision: bool = False,
    batch_num_images: Optional[Any] = None,
    vision_aspect_ratio: Optional[str] = None,
) -> List[List[ImageView]]:
    """The views of every image of a LLaVA-NeXT or LLaVA-OneVision batch.

    Args:
        input_ids: ``(B, S)`` token ids with the processor's image tokens.
        config: The model's config (``image_token_id``, ``image_grid_pinpoints``,
            ``vision_config``, OneVision's ``vision_aspect_ratio``).
        image_sizes: ``(n_images, 2)`` original ``(H, W)`` of every image, as the
            processor returns them.
        onevision: LLaVA-OneVision's rules (multi-image images unpatched, ``anyres_max``).
        batch_num_images: OneVision: images per sample, as the processor returns them
            (samples with several images are not cropped); None: every image is cropped.
        vision_aspect_ratio: OneVision: ``"anyres_max_N"``; None reads the config.

    Returns:
        Per sample, its views: two per cropped image (``"base"``, ``"crops"``), one per
        uncropped image.
    """
    vision = config.vision_config
    crop, patch = int(vision.image_size), int(vision.patch_size)
    cells = crop // patch
    pinpoints = [tuple(int(v) for v in p) for p in config.image_grid_pinpoints]
    sizes = [(int(h), int(w)) for h, w in size_rows(image_sizes)]
    if onevision and batch_num_images is not None:
        patched = [int(n) == 1 for n in flat_ints(batch_num_images) for _ in range(int(n))]
    else:
        patched = [True] * len(sizes)
    if len(patched) != len(sizes):
        raise ValueError(
            f"batch_num_images counts {len(patched)} images but image_sizes has "
            f"{len(sizes)}: give both as the processor returns them."
        )
    max_crops = None
    if onevision:
        ratio = vision_aspect_ratio or getattr(config, "vision_aspect_ratio", "anyres_max_9")
        max_crops = int(str(ratio).rsplit("_", 1)[-1])  # as HF: "anyres_max_9" -> 9
    layouts: List[Optional[Tuple[Tuple[int, int], Tuple[float, float, float, float]]]] = []
    counts = []
    for size, crops in zip(sizes, patched):
        if crops:
            grid, box = crop_layout(size, pinpoints, crop, patch, max_crops)
            layouts.append((grid, box))
            counts.append(cells * cells + grid[0] * (grid[1] + 1))
        else:
            layouts.append(None)
            counts.append(cells * cells + 1)
    family = "LLaVA-OneVision" if onevision else "LLaVA-NeXT"
    images = split_images(input_ids, int(config.image_token_id), counts, family)
    views: List[List[ImageView]] = [[] for _ in range(input_ids.shape[0])]
    for image, ((sample, positions), size, layout) in enumerate(zip(images, sizes, layouts)):
        base = positions[: cells * cells]
        whole = _square_box(size) if layout is None else (0.0, 0.0, 1.0, 1.0)
        views[sample].append(
            ImageView(image, base, (cells, cells), in_pixels(whole, size), size, "base")
        )
        if layout is None:
            continue
        grid, box = layout
        rest = positions[cells * cells :].view(grid[0], grid[1] + 1)[:, : grid[1]]
        views[sample].append(
            ImageView(image, rest.reshape(-1), grid, in_pixels(box, size), size, "crops")
        )
    return views


def anyres_rules(config: Any, onevision: bool = False) -> ViewRules:
    """The :class:`~captum_legrad.views.ViewRules` of a LLaVA-NeXT (``onevision=False``) or
    LLaVA-OneVision model's ``config``: ``image_sizes`` (and OneVision's
    ``batch_num_images``) as the processor returns them; ``pixel_values`` ``(n_images,
    crops, C, h, w)``."""
    family = "LLaVA-OneVision" if onevision else "LLaVA-NeXT"

    def describe(ids: Tensor, mask: Tensor, inputs: Mapping[str, Any]) -> List[SampleViews]:
        if inputs.get("pixel_values_videos") is not None:
            raise ValueError(
                f"{family}'s answer maps cover images; videos (pixel_values_videos) are not "
                "supported: explain the frames as images."
            )
        sizes = inputs.get("image_sizes")
        if sizes is None:
            raise ValueError(
                f"{family}'s answer maps need image_sizes (each image's original size, which "
                "sets its crops): pass the processor's image_sizes to AnswerLogits."
            )
        views = anyres_views(
            padding_out(ids, mask), config, sizes, onevision=onevision,
            batch_num_images=inputs.get("batch_num_images"),
            vision_aspect_ratio=inputs.get("vision_aspect_ratio"),
        )  # fmt: skip
        return as_samples(views)

    def to_input(canvases: List[List[Tensor]], name: str, inputs: Mapping[str, Any]) -> Tensor:
        pixels = inputs[name]
        if pixels.dim() != 5:
            raise ValueError(
                f'output="input" for {family} needs pixel_values as the processor returns '
                f"them, (n_images, crops, C, h, w); got {tuple(pixels.shape)}: use "
                'output="map".'
            )
        sizes = [(int(h), int(w)) for h, w in size_rows(inputs["image_sizes"])]
        counts = inputs.get("batch_num_images")
        patched = [True] * len(sizes)
        if onevision and counts is not None:
            patched = [int(n) == 1 for n in flat_ints(counts) for _ in range(int(n))]
        images = [canvas for sample in canvases for canvas in sample]
        out = pixels.new_zeros((images[0].shape[0], *pixels.shape))
        for i, canvas in enumerate(images):
            boxes = frame_boxes(sizes[i], config, patched[i])
            for f, box in enumerate(boxes):
                out[:, i, f] = resample_box(canvas, box, pixels.shape[-2:]).unsqueeze(1)
        return out

    return ViewRules(
        describe=describe, main_input=lambda inputs: "pixel_values", batch_first=False,
        to_input=to_input,
    )  # fmt: skip


def frame_boxes(
    size: Tuple[int, int], config: Any, patched: bool = True
) -> List[Tuple[float, float, float, float]]:
    """The rectangle of the original image (in its pixels) each frame of an image's
    ``pixel_values`` shows: the base view, then the crops of the padded canvas, row-major
    (a crop may reach over the padding, beyond the image)."""
    height, width = size
    if not patched:
        top, left, bottom, right = _square_box(size)
        return [(top * height, left * width, bottom * height, right * width)]
    crop = int(config.vision_config.image_size)
    pinpoints = [tuple(int(v) for v in p) for p in config.image_grid_pinpoints]
    best = _best_resolution(size, pinpoints)
    new_h, new_w = _resized(size, best)
    paste_y, paste_x = (best[0] - new_h) // 2, (best[1] - new_w) // 2
    boxes = [(0.0, 0.0, float(height), float(width))]
    for i in range(best[0] // crop):
        for j in range(best[1] // crop):
            boxes.append(
                (
                    (i * crop - paste_y) * height / new_h,
                    (j * crop - paste_x) * width / new_w,
                    ((i + 1) * crop - paste_y) * height / new_h,
                    ((j + 1) * crop - paste_x) * width / new_w,
                )
            )
    return boxes


#: The classes this module describes.
CLASSES = ("LlavaNextForConditionalGeneration", "LlavaOnevisionForConditionalGeneration")


def rules(config: Any) -> ViewRules:
    """The family's :class:`~captum_legrad.views.ViewRules`: :func:`anyres_rules`, with
    LLaVA-OneVision's rules for a ``llava_onevision`` config."""
    return anyres_rules(config, getattr(config, "model_type", None) == "llava_onevision")


def token_step(config: Any) -> int:
    """1: the views' boxes carry the geometry (``VLMParts.grid`` is unused)."""
    return 1
