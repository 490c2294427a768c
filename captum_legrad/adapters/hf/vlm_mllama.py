"""Mllama (``MllamaForConditionalGeneration``, Llama 3.2 Vision): cross-attention to tiles.

Mllama's text decoder never holds image tokens: the image enters through the
**cross-attention decoder layers** (``text_config.cross_attention_layers``), whose queries
are the text positions and whose keys are the vision tokens (``docs/method.md``,
"Cross-attention VLMs"). These layers are LeGrad's blocks (:func:`language_parts`,
:data:`ATTENTION`), and a view's ``positions`` index **their keys**, not the sequence
(``ViewRules.cross_keys``).

The image processor (``MllamaImageProcessor``) picks a canvas of ``r × c`` tiles of
``T × T`` (``get_optimal_tiled_canvas``), resizes the image with its aspect ratio kept to
``h' × w'`` inside it (:func:`content_size`, the processor's
``get_image_size_fit_to_canvas``), pads the bottom and right and cuts the canvas into
tiles, row-major; ``pixel_values`` is ``(B, images, max_num_tiles, C, T, T)``, the tiles
beyond ``r·c`` zero (``aspect_ratio_mask`` 0) and ``aspect_ratio_ids[b, i]`` (1-based, 0
for a padding image) indexes ``vision_config.supported_aspect_ratios``, ``(r, c)``. The
cross-attention keys of a sample are laid out ``(images, max_num_tiles, 1 + P²)``: each
tile's CLS token, then its ``P × P`` patches row-major (``P = T / patch_size``).

Each image is **one view**: its ``r·c`` tiles' patch grids placed at their rectangles form
the ``(r·P) × (c·P)`` grid of the canvas (the view's positions list, cell by cell, the key
of the patch there; the CLS tokens and the padding tiles are not listed), and the view's
box is the whole canvas in pixels of the original image, ``(r·T·H/h') × (c·T·W/w')``: it
reaches beyond the image by the padding, which the placement cuts off. So
``output="grid"`` is the canvas grid, ``output="map"`` the original image, and the tile
``k`` map is the canvas grid's block ``(⌊k / c⌋, k mod c)`` (:func:`tile_maps`). The
tiles do not overlap and there is no global view, so no pixel is covered twice.
``image_sizes`` (each image's original ``(H, W)``, which the processor does not return) is
required and not passed to the model.
"""

from __future__ import annotations

import math
from typing import Any, List, Mapping, Optional, Sequence, Tuple, cast

import torch
from torch import Tensor, nn

from ...errors import UnsupportedModelError
from ...views import SampleViews, ViewRules
from .vlm_tiles import (
    ImageView,
    as_samples,
    check_image_count,
    image_size_of,
    resample_box,
)

__all__ = [
    "CLASSES", "ATTENTION", "content_size", "tile_grid", "tile_maps", "views", "rules",
    "token_step", "language_parts",
]  # fmt: skip

#: The classes this module describes.
CLASSES = ("MllamaForConditionalGeneration",)

#: The attribute of each block (cross-attention decoder layer) holding its attention.
ATTENTION = "cross_attn"


def content_size(height: int, width: int, canvas: Tuple[int, int], tile: int) -> Tuple[int, int]:
    """The size ``(h', w')`` the processor resizes an ``height × width`` image to inside its
    ``canvas`` (``get_image_size_fit_to_canvas``): the aspect ratio kept, each side
    between ``tile`` and the canvas; the rest of the canvas is padding."""
    target_w = min(max(width, tile), canvas[1])
    target_h = min(max(height, tile), canvas[0])
    scale_h = target_h / height
    scale_w = target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


def tile_grid(config: Any) -> int:
    """``P``: one tile's patches per side (``image_size / patch_size``)."""
    vision = config.vision_config
    return int(vision.image_size) // int(vision.patch_size)


def _canvas_keys(image: int, rows: int, cols: int, side: int, tiles: int) -> Tensor:
    """The cross-attention key of every cell of image ``image``'s ``(rows·P) × (cols·P)``
    canvas grid, row-major; the keys are ``(images, tiles, 1 + P²)``, CLS first."""
    y = torch.arange(rows * side).view(-1, 1)
    x = torch.arange(cols * side).view(1, -1)
    tile = (y // side) * cols + x // side
    patch = (y % side) * side + x % side
    return ((image * tiles + tile) * (1 + side * side) + 1 + patch).flatten()


def tile_maps(canvas: Tensor, rows: int, cols: int) -> Tensor:
    """An image's canvas-grid maps ``(K, r·P, c·P)`` (its view's map,
    ``AnswerLogits.view_maps``) → the per-tile maps ``(K, r·c, P, P)``, tiles row-major as
    the processor cuts them.

    Examples::

        >>> (canvas,) = explained.view_maps(inputs.pixel_values)[0]  # one image
        >>> tiles = tile_maps(canvas, rows, cols)  # (T, rows·cols, P, P)
    """
    k, height, width = canvas.shape
    if height % rows or width % cols:
        raise ValueError(
            f"A {height}x{width} canvas grid does not split into {rows}x{cols} tiles: pass the "
            "image's tile rows and columns (its aspect ratio)."
        )
    side_h, side_w = height // rows, width // cols
    split = canvas.reshape(k, rows, side_h, cols, side_w).permute(0, 1, 3, 2, 4)
    return split.reshape(k, rows * cols, side_h, side_w)


def views(
    aspect_ratio_ids: Tensor,
    aspect_ratio_mask: Optional[Tensor],
    config: Any,
    image_sizes: Optional[Sequence[Sequence[int]]],
) -> List[List[ImageView]]:
    """Each sample's views: one per image, its canvas grid (CLS and padding tiles left out).

    Args:
        aspect_ratio_ids: ``(B, images)`` as the processor returns it (0: no image).
        aspect_ratio_mask: ``(B, images, max_num_tiles)`` as the processor returns it, or
            None; checked against the tile grid.
        config: The model's config (``vision_config``: ``image_size``, ``patch_size``,
            ``max_num_tiles``, ``supported_aspect_ratios``).
        image_sizes: The original ``(H, W)`` of every image, in the processor's order
            (required: the canvas's padding depends on it).

    Raises:
        ValueError: an aspect-ratio id outside ``supported_aspect_ratios``, an
            ``aspect_ratio_mask`` that disagrees with it, or ``image_sizes`` missing.
    """
    vision = config.vision_config
    tile = int(vision.image_size)
    side = tile_grid(config)
    tiles = int(vision.max_num_tiles)
    supported = [tuple(int(v) for v in ratio) for ratio in vision.supported_aspect_ratios]
    out: List[List[ImageView]] = []
    image = 0
    for b, row in enumerate(aspect_ratio_ids.tolist()):
        sample: List[ImageView] = []
        for i, ratio_id in enumerate(row):
            if ratio_id == 0:  # a padding image of a shorter sample
                continue
            if not 1 <= ratio_id <= len(supported):
                raise ValueError(
                    f"aspect_ratio_ids[{b}, {i}] is {ratio_id}, not one of the model's "
                    f"{len(supported)} supported aspect ratios: build the image inputs with "
                    "the model's processor (max_image_tiles = the model's max_num_tiles)."
                )
            rows, cols = supported[ratio_id - 1]
            if aspect_ratio_mask is not None:
                kept = int(aspect_ratio_mask[b, i].sum())
                if kept != rows * cols or not bool(aspect_ratio_mask[b, i, :kept].all()):
                    raise ValueError(
                        f"aspect_ratio_mask[{b}, {i}] keeps {kept} tiles but the aspect ratio "
                        f"{rows}x{cols} has {rows * cols}: pass the processor's inputs as it "
                        "returns them."
                    )
            h, w = image_size_of(image_sizes, image, "Mllama", "its canvas is padded")
            fit = content_size(h, w, (rows * tile, cols * tile), tile)
            box = (0.0, 0.0, rows * tile * h / fit[0], cols * tile * w / fit[1])
            keys = _canvas_keys(i, rows, cols, side, tiles)
            grid = (rows * side, cols * side)
            sample.append(ImageView(image, keys, grid, box, (h, w), "image"))
            image += 1
        out.append(sample)
    return out


def rules(config: Any) -> ViewRules:
    """Mllama's :class:`~captum_legrad.views.ViewRules`: one canvas-grid view per image,
    positions on the cross-attention keys; ``cross_attention_mask`` extended over the
    answer by repeating the last prompt row (as ``generate`` does); ``image_sizes``
    required and not passed to the model."""
    tile = int(config.vision_config.image_size)
    tiles = int(config.vision_config.max_num_tiles)
    side = tile_grid(config)

    def describe(ids: Tensor, mask: Tensor, inputs: Mapping[str, Any]) -> List[SampleViews]:
        ratio_ids = inputs.get("aspect_ratio_ids")
        if ratio_ids is None:
            raise ValueError(
                "Mllama needs aspect_ratio_ids (and aspect_ratio_mask, cross_attention_mask): "
                "pass the processor's outputs by their names."
            )
        ratio = torch.as_tensor(ratio_ids).view(ids.shape[0], -1).cpu()
        given = inputs.get("aspect_ratio_mask")
        ratio_mask = None if given is None else torch.as_tensor(given).cpu()
        sizes_given = inputs.get("image_sizes")
        sizes = None if sizes_given is None else torch.as_tensor(sizes_given).view(-1, 2).tolist()
        found = views(ratio, ratio_mask, config, sizes)
        assert sizes is not None  # views() raises without them
        check_image_count(sizes, found)
        return as_samples(found)

    def cross_keys(inputs: Mapping[str, Any]) -> int:
        pixels = inputs["pixel_values"]  # (B, images, tiles, C, T, T)
        return int(pixels.shape[1]) * tiles * (1 + side * side)

    def to_input(canvases: List[List[Tensor]], name: str, inputs: Mapping[str, Any]) -> Tensor:
        pixels = inputs[name]  # (B, images, tiles, C, T, T)
        out = pixels.new_zeros((canvases[0][0].shape[0], *pixels.shape))
        found = views(
            torch.as_tensor(inputs["aspect_ratio_ids"]).view(pixels.shape[0], -1).cpu(), None,
            config, torch.as_tensor(inputs["image_sizes"]).view(-1, 2).tolist(),
        )  # fmt: skip
        for b, (sample, maps) in enumerate(zip(found, canvases)):
            for view, canvas in zip(sample, maps):
                rows, cols = view.grid[0] // side, view.grid[1] // side
                height, width = view.box[2] / rows, view.box[3] / cols  # one tile, original px
                i = int(view.positions[0]) // (tiles * (1 + side * side))
                for k in range(rows * cols):
                    r, c = divmod(k, cols)
                    box = (r * height, c * width, (r + 1) * height, (c + 1) * width)
                    out[:, b, i, k] = resample_box(canvas, box, (tile, tile)).unsqueeze(1)
        return out

    return ViewRules(
        describe=describe,
        main_input=lambda inputs: "pixel_values",
        per_token={"cross_attention_mask": None},
        batch_first=False,  # aspect_ratio_* and cross_attention_mask are split with it
        to_input=to_input,
        consumed=("image_sizes",),
        cross_keys=cross_keys,
    )


def token_step(config: Any) -> int:
    """The processed pixels one canvas-grid cell covers per side: the patch size."""
    return int(config.vision_config.patch_size)


def language_parts(
    model: nn.Module,
) -> Tuple[nn.Module, Tuple[nn.Module, ...], nn.Module, nn.Module]:
    """``(inner, blocks, norm, lm_head)``: the base model, the text model's
    **cross-attention** decoder layers (``text_config.cross_attention_layers``; the
    self-attention layers have no image keys and are not blocks), its final norm and the
    output projection."""
    m: Any = cast(Any, model)
    text = m.model.language_model
    cross = [int(i) for i in m.config.get_text_config().cross_attention_layers]
    present = [i for i in cross if 0 <= i < len(text.layers)]
    if not present:
        raise UnsupportedModelError(
            f"{type(model).__name__} reads no image: none of its "
            f"text_config.cross_attention_layers {cross} is one of its {len(text.layers)} "
            "decoder layers, so no layer has image keys; check the configuration"
        )
    return m.model, tuple(text.layers[i] for i in present), text.norm, m.lm_head
