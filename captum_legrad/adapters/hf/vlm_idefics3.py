"""Idefics3 and SmolVLM: tiles plus the global image, pixel shuffle.

The processor resizes an image so that both sides are multiples of the tile side ``T``
(``max_image_size``), cuts it into ``rows × cols`` tiles (row-major) and appends the whole
image resized to ``T × T`` (the global image); an image no larger than a tile is one
frame, the whole image. The text holds, per tile,
``<fake_token_around_image><row_i_col_j>`` then the tile's ``image_seq_len`` image tokens,
a newline after every row of tiles, then ``\\n<fake_token_around_image><global-img>``, the
global image's tokens and ``<fake_token_around_image>``. Every frame is a SigLIP patch grid
pixel-shuffled by ``scale_factor``: its tokens are an ``s × s`` grid (``s = T / patch /
scale_factor``), row-major.

The tiles and rows are read from ``input_ids`` alone: each frame's tokens are one run of
image tokens; the id before a run is its tag (``<row_i_col_j>`` or ``<global-img>``; every
image ends with a global frame, so the tag before a sample's last run is the global tag),
the id after a global run is ``<fake_token_around_image>``, and a gap between two tiles
that starts with it continues a row, while a gap that starts otherwise (the newline)
starts a new row. Frames padded by the processor (``pixel_attention_mask``) keep only the
tokens over real pixels.
"""

from __future__ import annotations

from typing import Any, List, Mapping, Optional, Tuple

import torch
from torch import Tensor

from ...views import SampleViews, ViewRules
from .vlm_tiles import ImageView, as_samples, in_pixels, padding_out, resample_box
from .vlm_tiles import runs as token_runs

__all__ = ["CLASSES", "tile_views", "tile_rules", "rules", "token_step"]


def _valid(mask: Optional[Tensor], side: int) -> Tuple[int, int]:
    """The real pixels ``(h, w)`` of a frame from its ``pixel_attention_mask`` (top-left)."""
    if mask is None:
        return side, side
    rows = torch.nonzero(mask.any(dim=1))
    cols = torch.nonzero(mask.any(dim=0))
    if rows.numel() == 0:
        return side, side
    return int(rows.max()) + 1, int(cols.max()) + 1


def tile_views(
    input_ids: Tensor,
    config: Any,
    pixel_values: Optional[Tensor] = None,
    pixel_attention_mask: Optional[Tensor] = None,
    family: str = "Idefics3",
) -> List[List[ImageView]]:
    """The views of every image of an Idefics3 / SmolVLM batch.

    Args:
        input_ids: ``(B, S)`` token ids as the processor builds them.
        config: The model's config (``image_token_id``, ``scale_factor``,
            ``vision_config.image_size`` / ``patch_size``).
        pixel_values: ``(B, frames, C, T, T)``, for the frames' sizes; frames the model
            skips (all zero) are skipped here too. None: every frame is a full ``T × T``.
        pixel_attention_mask: ``(B, frames, T, T)``, 1 over real pixels, as the processor
            returns it. None: every pixel is real.
        family: The model's name, for messages.

    Returns:
        Per sample, one view per tile (``"tile"``, named ``"tile i,j"``, with its
        rectangle) and one per global image (``"global"``, the whole image); an unsplit
        image is one ``"global"`` view.
    """
    vision = config.vision_config
    side, patch = int(vision.image_size), int(vision.patch_size)
    scale = int(config.scale_factor)
    cells = side // patch // scale
    per_frame = cells * cells
    cell_px = patch * scale
    image_id = int(config.image_token_id)
    batch = input_ids.shape[0]
    real: Optional[Tensor] = None
    if pixel_values is not None:
        flat = pixel_values.reshape(pixel_values.shape[0], pixel_values.shape[1], -1)
        real = (flat != 0).any(dim=-1)  # (B, frames): the frames the model encodes
        if real.shape[0] != batch:
            raise ValueError(
                f"{family}: pixel_values has {real.shape[0]} samples but input_ids {batch}: "
                "give one row of frames per sample, as the processor returns them."
            )
    views: List[List[ImageView]] = []
    image = 0
    for b in range(batch):
        row = input_ids[b]
        runs = token_runs(row, image_id)
        sample: List[ImageView] = []
        views.append(sample)
        if not runs:
            continue
        for start, end in runs:
            if end - start != per_frame or start == 0 or end >= row.numel():
                raise ValueError(
                    f"{family}: an image-token run of {end - start} tokens at position {start}, "
                    f"but every frame has image_seq_len = {per_frame} tokens between its tag "
                    "and the next token. Build input_ids with the model's processor."
                )
        tags = [int(row[start - 1]) for start, _ in runs]
        global_tag = tags[-1]
        fake = int(row[runs[-1][1]])
        frames: List[int] = []
        if real is not None:
            frames = torch.nonzero(real[b])[:, 0].tolist()
            if len(frames) != len(runs):
                raise ValueError(
                    f"{family}: sample {b} has {len(runs)} frames of image tokens but "
                    f"{len(frames)} frames in pixel_values: give them as the processor returns "
                    "them."
                )
        first = 0
        for k, tag in enumerate(tags):
            if tag != global_tag:
                continue
            tiles = list(range(first, k))
            n_rows, n_cols = _grid(row, runs, tiles, fake, family)
            for slot, frame_run in enumerate([*tiles, k]):
                start, end = runs[frame_run]
                positions = torch.arange(start, end, device=row.device)
                valid = (side, side)
                if pixel_attention_mask is not None and frames:
                    valid = _valid(pixel_attention_mask[b, frames[frame_run]].bool(), side)
                grid = (-(-valid[0] // cell_px), -(-valid[1] // cell_px))
                positions = positions.view(cells, cells)[: grid[0], : grid[1]].reshape(-1)
                # The kept cells cover grid·cell_px pixels of the valid valid[0]×valid[1].
                reach = (grid[0] * cell_px / valid[0], grid[1] * cell_px / valid[1])
                size = (n_rows * side, n_cols * side) if tiles else valid
                if frame_run == k:
                    box = (0.0, 0.0, reach[0], reach[1])
                    kind, name = "global", None
                else:
                    i, j = divmod(slot, n_cols)
                    box = (
                        i / n_rows, j / n_cols,
                        (i + reach[0]) / n_rows, (j + reach[1]) / n_cols,
                    )  # fmt: skip
                    kind, name = "tile", f"tile {i},{j}"
                box = in_pixels(box, size)
                sample.append(ImageView(image, positions, grid, box, size, kind, name))
            image += 1
            first = k + 1
        if first != len(runs):
            raise ValueError(
                f"{family}: sample {b}'s last image has tiles but no global image after them: "
                "build input_ids with the model's processor."
            )
    return views


def _grid(
    row: Tensor, runs: List[Tuple[int, int]], tiles: List[int], fake: int, family: str
) -> Tuple[int, int]:
    """``(rows, cols)`` of an image's tiles from the gaps between their runs."""
    n = len(tiles)
    if n == 0:
        return 0, 0
    # Gap m lies between tile m and tile m + 1; it continues a row when it starts with the
    # <fake_token_around_image> id.
    continues = [int(row[runs[tiles[m]][1]]) == fake for m in range(n - 1)]
    cols = next((m + 1 for m, c in enumerate(continues) if not c), n)
    if n % cols or any(c != ((m + 1) % cols != 0) for m, c in enumerate(continues)):
        raise ValueError(
            f"{family}: the {n} tiles of an image are not laid out in rows of equal length "
            "(<fake_token_around_image><row_i_col_j> between tiles, a newline between rows): "
            "build input_ids with the model's processor."
        )
    return n // cols, cols


def tile_rules(config: Any, family: str) -> ViewRules:
    """The :class:`~captum_legrad.views.ViewRules` of an Idefics3 or SmolVLM model's
    ``config``: ``pixel_values`` ``(B, frames, C, T, T)`` and ``pixel_attention_mask`` as
    the processor returns them."""

    def describe(ids: Tensor, mask: Tensor, inputs: Mapping[str, Any]) -> List[SampleViews]:
        views = tile_views(
            padding_out(ids, mask), config, inputs.get("pixel_values"),
            inputs.get("pixel_attention_mask"), family,
        )  # fmt: skip
        return as_samples(views)

    def to_input(canvases: List[List[Tensor]], name: str, inputs: Mapping[str, Any]) -> Tensor:
        pixels = inputs[name]  # (B, frames, C, T, T)
        side = int(pixels.shape[-1])
        out = pixels.new_zeros((canvases[0][0].shape[0], *pixels.shape))
        for b, sample in enumerate(canvases):
            frame = 0
            for canvas in sample:
                height, width = canvas.shape[-2:]
                rows, cols = height // side, width // side
                boxes = []
                if rows * cols > 1:  # split: the tiles row-major, then the global image
                    boxes = [
                        (i * side, j * side, (i + 1) * side, (j + 1) * side)
                        for i in range(rows)
                        for j in range(cols)
                    ]
                    boxes.append((0, 0, height, width))
                else:  # one frame, the canvas its real pixels at 1:1
                    boxes.append((0, 0, side, side))
                for box in boxes:
                    out[:, b, frame] = resample_box(canvas, box, (side, side)).unsqueeze(1)
                    frame += 1
        return out

    # (B, frames, C, T, T): batch-first, but not an image batch LeGrad could split or check.
    return ViewRules(
        describe=describe, main_input=lambda inputs: "pixel_values", batch_first=False,
        to_input=to_input,
    )  # fmt: skip


#: The classes this module describes.
CLASSES = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")


def rules(config: Any) -> ViewRules:
    """The family's :class:`~captum_legrad.views.ViewRules`: :func:`tile_rules`, named
    SmolVLM for a ``smolvlm`` config and Idefics3 otherwise."""
    smol = getattr(config, "model_type", None) == "smolvlm"
    return tile_rules(config, "SmolVLM" if smol else "Idefics3")


def token_step(config: Any) -> int:
    """1: the views' boxes carry the geometry (``VLMParts.grid`` is unused)."""
    return 1
