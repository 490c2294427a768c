"""Image views of a vision-language model's sequence: which image tokens came from where.

A tiled or multi-crop VLM turns one image into several *views* (a downscaled base or
global view, crops or tiles of a larger copy); each view's tokens form a grid over a
rectangle of the original image. :class:`ImageView` records, for one view of one image of
one sample, the sequence positions of its tokens (row-major over its grid; separator and
newline tokens left out) and the rectangle of the original image it covers, as fractions of
the image's height and width (a view of a padded copy may reach beyond ``[0, 1]``: its
cells over the padding lie outside the image).

The per-family rules (``llava_next``, ``idefics3``, ``mistral3``) build the views from
``input_ids``, the model's config and the processor's outputs, following the placement of
the model's own ``get_image_features`` and placeholder scatter: the image tokens of the
whole batch, in row-major order over ``(B, S)``, receive the image features in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ...views import SampleViews, Source, View

__all__ = [
    "ImageView", "split_images", "image_index", "size_rows", "flat_ints", "as_samples",
    "padding_out",
]  # fmt: skip


@dataclass(frozen=True)
class ImageView:
    """One view of one image: its tokens' positions, grid, and the rectangle it covers.

    Attributes:
        sample: The sample (row of ``input_ids``) the view's tokens are in.
        image: The image's index within its sample (0 for the first image).
        positions: ``(g_h·g_w,)`` sequence positions of the view's tokens, row-major over
            ``grid``.
        grid: ``(g_h, g_w)``, the view's token grid.
        box: ``(top, left, bottom, right)``: the rectangle of the original image the grid
            covers, as fractions of the image's height and width.
        size: ``(H, W)``: the original image's size in pixels (the processor's
            ``image_sizes`` where it gives them, else the size the model's processor
            resized the whole image to).
        kind: What the view is: ``"base"``, ``"crops"``, ``"tile"``, ``"global"`` or
            ``"image"``.
    """

    sample: int
    image: int
    positions: Tensor
    grid: Tuple[int, int]
    box: Tuple[float, float, float, float]
    size: Tuple[int, int]
    kind: str

    def __post_init__(self) -> None:
        if self.positions.dim() != 1 or self.positions.numel() != self.grid[0] * self.grid[1]:
            raise ValueError(
                f"ImageView.positions must hold g_h·g_w = {self.grid[0] * self.grid[1]} "
                f"positions, got shape {tuple(self.positions.shape)}."
            )


def split_images(
    input_ids: Tensor, image_token_id: int, counts: Sequence[int], family: str
) -> List[Tuple[int, Tensor]]:
    """The image tokens of a batch, image by image, as the model scatters its features.

    Args:
        input_ids: ``(B, S)`` token ids.
        image_token_id: The image placeholder id.
        counts: Image tokens of each image, in the order of the processor's images.
        family: The model's name, for messages.

    Returns:
        One ``(sample, positions)`` per image: the sample holding it and the sequence
        positions of its tokens, in order.

    Raises:
        ValueError: the image tokens do not match ``counts`` or an image's tokens are
            spread over two samples.
    """
    where = torch.nonzero(input_ids == image_token_id)  # (n, 2), row-major over (B, S)
    total = int(sum(counts))
    if where.shape[0] != total:
        raise ValueError(
            f"input_ids holds {where.shape[0]} image tokens (id {image_token_id}) but the "
            f"images of {family} need {total} ({list(counts)} per image, from the "
            "processor's outputs). Build input_ids and the image inputs with the model's "
            "processor, in one call."
        )
    out: List[Tuple[int, Tensor]] = []
    start = 0
    for count in counts:
        rows = where[start : start + count]
        start += count
        sample = int(rows[0, 0]) if count else 0
        if bool((rows[:, 0] != sample).any()):
            raise ValueError(
                f"An image's {count} tokens of {family} are spread over two samples: the "
                "image inputs do not belong to input_ids (give them as the processor returns "
                "them)."
            )
        out.append((sample, rows[:, 1]))
    return out


def image_index(images: Sequence[Tuple[int, Tensor]]) -> List[int]:
    """Each image's index within its sample, for :func:`split_images`' result."""
    seen: dict = {}
    index = []
    for sample, _ in images:
        index.append(seen.get(sample, 0))
        seen[sample] = index[-1] + 1
    return index


def size_rows(value: Any) -> List[Sequence[Any]]:
    """``(n, 2)`` sizes (tensor or nested lists) as rows."""
    if isinstance(value, Tensor):
        return [tuple(row) for row in value.reshape(-1, 2).tolist()]
    return [tuple(row) for row in value]


def flat_ints(value: Any) -> List[Any]:
    """A tensor or nested list of ints, flattened."""
    if isinstance(value, Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    out: List[Any] = []
    for v in value:
        out.extend(flat_ints(v) if isinstance(v, (list, tuple)) else [v])
    return out


def as_samples(views: Sequence[ImageView], batch: int) -> List[SampleViews]:
    """The views as :class:`~captum_legrad.views.SampleViews`, one per sample: each image a
    :class:`~captum_legrad.views.Source` of its size, each view's rectangle in its pixels
    (a view of a padded copy may reach beyond the image: its cells over the padding lie
    outside the canvas and are cut off when the views are placed)."""
    out = []
    for b in range(batch):
        mine = [v for v in views if v.sample == b]
        sizes: dict = {}
        for v in mine:
            sizes.setdefault(v.image, v.size)
        sources = tuple(Source("image", sizes[i]) for i in range(len(sizes)))
        placed = []
        for v in mine:
            height, width = v.size
            top, left, bottom, right = v.box
            box = (
                round(top * height), round(left * width),
                round(bottom * height), round(right * width),
            )  # fmt: skip
            placed.append(View(v.positions, v.grid, v.image, box, None, v.kind))
        out.append(SampleViews(sources, tuple(placed)))
    return out


def padding_out(input_ids: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
    """``input_ids`` with padding positions set to -1 (never an image token)."""
    if attention_mask is None:
        return input_ids
    return input_ids.masked_fill(attention_mask.to(input_ids.device) == 0, -1)


def resample_box(canvas: Tensor, box: Sequence[float], size: Tuple[int, int]) -> Tensor:
    """A canvas map ``(K, H, W)`` seen through a frame: the frame's ``size`` pixels cover
    ``box`` ``(top, left, bottom, right)`` of the canvas (in its pixels, possibly beyond
    it); bilinear, zero outside the canvas. ``(K, h, w)``."""
    import torch.nn.functional as F

    height, width = canvas.shape[-2:]
    top, left, bottom, right = (float(v) for v in box)
    h, w = size
    ys = top + (torch.arange(h, dtype=torch.float64) + 0.5) * (bottom - top) / h
    xs = left + (torch.arange(w, dtype=torch.float64) + 0.5) * (right - left) / w
    # grid_sample's align_corners=False: -1 and 1 are the canvas' outer edges.
    grid = torch.stack(
        torch.meshgrid(2 * xs / width - 1, 2 * ys / height - 1, indexing="xy"), dim=-1
    ).to(canvas)
    out = F.grid_sample(
        canvas.unsqueeze(0), grid.unsqueeze(0), mode="bilinear", padding_mode="border",
        align_corners=False,
    )[0]  # fmt: skip
    inside = ((ys >= 0) & (ys < height)).to(canvas)[:, None] * ((xs >= 0) & (xs < width)).to(
        canvas
    )[None, :]
    return out * inside
