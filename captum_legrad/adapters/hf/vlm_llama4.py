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
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, cast

import torch
from torch import Tensor, nn

from ...errors import UnsupportedModelError
from .vlm_tiles import ImageView, as_samples, check_image_count, image_size_of, runs

__all__ = [
    "CLASSES", "Base", "chunked_layers", "tokens_per_tile", "content_size", "views", "rules",
    "token_step", "language_parts",
]  # fmt: skip


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
    size: Tuple[int, int],
    kind: str,
) -> Optional[ImageView]:
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
    return ImageView(image, row.new_tensor(index), (keep_h, keep_w), box, size, kind)


def views(
    input_ids: Tensor,
    image_token_id: int,
    boi_token_id: int,
    eoi_token_id: int,
    grid: Tuple[int, int],
    tile: int,
    image_sizes: Optional[Sequence[Sequence[int]]],
    resize_to_max_canvas: bool = False,
) -> List[List[ImageView]]:
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
    out: List[List[ImageView]] = []
    image = 0
    for row in input_ids:
        sample: List[ImageView] = []
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
                    image, (h, w), "tile" if len(patches) > 1 else "image",
                )  # fmt: skip
                if view is not None:
                    sample.append(view)
            if len(patches) > 1:
                a, b = patches[-1]
                positions = row.new_tensor(range(a, b))
                box = (0.0, 0.0, float(h), float(w))
                sample.append(ImageView(image, positions, grid, box, (h, w), "global"))
            image += 1
        out.append(sample)
    return out


#: The classes this module describes.
CLASSES = ("Llama4ForConditionalGeneration",)


def chunked_layers(config: Any) -> List[int]:
    """The text model's chunked-attention layers (``layer_types``)."""
    text = config.get_text_config()
    types = list(getattr(text, "layer_types", None) or [])
    return [i for i, kind in enumerate(types) if kind == "chunked_attention"]


class Base(nn.Module):
    """Llama 4's forward up to the language model's final norm: the base model
    :class:`~captum_legrad.AnswerLogits` runs (``Llama4ForConditionalGeneration`` has no
    ``model.model``). The whole model runs, with ``logits_to_keep=1`` (one row of logits),
    and the final norm's output is returned (read by a forward hook removed after the
    call), as a one-tuple like a base model's output.

    It refuses a sequence longer than the text model's ``attention_chunk_size`` when the
    model has chunked-attention layers: those layers attend only within a chunk, so
    answer tokens in a later chunk than the image do not attend to it there, and LeGrad
    would differentiate attention the model masks.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.training = model.training  # the wrapper's own flag only, not recursive
        config: Any = model.config
        self.chunked = chunked_layers(config)
        self.chunk = getattr(config.get_text_config(), "attention_chunk_size", None)

    def forward(
        self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, **kwargs: Any
    ) -> Tuple[Tensor]:
        length = input_ids.shape[1]
        if self.chunked and self.chunk is not None:
            valid = (
                torch.full((input_ids.shape[0],), length)
                if attention_mask is None
                else (attention_mask != 0).sum(dim=1)
            )
            longest = int(valid.max())
            if longest > int(self.chunk):
                raise UnsupportedModelError(
                    f"This Llama 4 sequence (prompt and answer) has {longest} tokens, more "
                    f"than the attention_chunk_size {self.chunk} of its chunked-attention "
                    f"layers {self.chunked}: there, answer tokens in a later chunk than the "
                    "image do not attend to it, so their attention cannot be explained. "
                    "Shorten the prompt or the answer (fewer tiles: the image processor's "
                    "max_patches) so that the whole sequence fits one chunk."
                )
        model: Any = self.model
        seen: Dict[str, Tensor] = {}

        def keep(module: nn.Module, args: Any, output: Tensor) -> None:
            seen["hidden"] = output

        handle = model.language_model.model.norm.register_forward_hook(keep)
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1, **kwargs)
        finally:
            handle.remove()
        return (seen["hidden"],)


def rules(config: Any) -> Any:
    """Llama 4's :class:`~captum_legrad.views.ViewRules`: every image's tiles (padding
    dropped) and global view. ``image_sizes`` (the original ``(H, W)`` per image, which the
    processor does not return) is required and not passed to the model."""
    from ...views import ViewRules

    vision = config.vision_config
    grid = tokens_per_tile(config)
    tile = int(vision.image_size)
    ids_of = (int(config.image_token_id), int(config.boi_token_id), int(config.eoi_token_id))

    def describe(ids: Tensor, mask: Tensor, inputs: Mapping[str, Any]) -> List[Any]:
        given = inputs.get("image_sizes")
        sizes = None if given is None else torch.as_tensor(given).view(-1, 2).tolist()
        found = views(ids.masked_fill(mask == 0, -1).cpu(), *ids_of, grid, tile, sizes)
        assert sizes is not None  # views() raises without them
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
    return int(config.vision_config.image_size) // tokens_per_tile(config)[0]


def language_parts(
    model: nn.Module,
) -> Tuple[nn.Module, Tuple[nn.Module, ...], nn.Module, nn.Module]:
    """``(inner, layers, norm, lm_head)``: Llama 4 has no base model, so the inner model is
    :class:`Base` (the whole model, read at the final norm)."""
    text: Any = cast(Any, model).language_model
    return Base(model), tuple(text.model.layers), text.model.norm, text.lm_head
