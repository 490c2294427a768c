"""Image views of a vision-language model's sequence: which image tokens came from where.

A tiled or multi-crop VLM turns one image into several *views* (a downscaled base or
global view, crops or tiles of a larger copy, or the whole image); each view's tokens form a
grid over a rectangle of the original image. This module is the one place the view families
(:data:`captum_legrad.adapters.hf.vlm.VIEW_FAMILIES`) share: the view record
(:class:`ImageView`), its one conversion to :class:`~captum_legrad.views.SampleViews`
(:func:`as_samples`: boxes rounded to pixels of the original image, every image a
:class:`~captum_legrad.views.Source` of its size), and the helpers over ``input_ids`` and
rectangles (:func:`runs`, :func:`split_images`, :func:`image_size_of`, :func:`tile_boxes`,
:func:`in_pixels`, :func:`check_image_count`, :func:`padding_out`, :func:`resample_box`).

Every family's rule returns, per sample, its views in sequence order (a list of
:class:`ImageView` per row of ``input_ids``): the image's index among all images of the
batch, the sequence positions of the view's tokens (row-major over its grid; separator
and newline tokens left out), the rectangle of the original image it covers **in pixels**
of that image (a view of a padded copy may reach beyond the image: its cells over the
padding lie outside it) and the image's size. Pixels, because the size is needed either
way (it is the image's canvas) and most rules find their rectangles in pixels; the rules
whose geometry is a fraction of the image (LLaVA-NeXT's crops, Idefics3's tiles) convert
with :func:`in_pixels`.

The per-family rules build the views from ``input_ids``, the model's config and the
processor's outputs, following the placement of the model's own ``get_image_features`` and
placeholder scatter: the image tokens of the whole batch, in row-major order over
``(B, S)``, receive the image features in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ...views import SampleViews, Source, View

__all__ = [
    "ImageView", "split_images", "size_rows", "flat_ints", "as_samples", "in_pixels",
    "padding_out", "resample_box", "runs", "image_size_of", "tile_boxes", "check_image_count",
]  # fmt: skip


@dataclass(frozen=True)
class ImageView:
    """One view of one image: its tokens' positions, grid, and the rectangle it covers.

    Attributes:
        image: The image's index among all images of the batch, in the processor's order
            (row-major over samples, then in order within a sample).
        positions: ``(g_h·g_w,)`` sequence positions of the view's tokens, row-major over
            ``grid`` (Mllama: positions of the cross-attention keys).
        grid: ``(g_h, g_w)``, the view's token grid.
        box: ``(top, left, bottom, right)``: the rectangle of the original image the grid
            covers, in its pixels (floats); cells split it evenly. It may reach beyond the
            image where the model's canvas was padded (the cells over the padding lie
            outside the image and are cut off when the views are placed).
        size: ``(H, W)``: the original image's size in pixels (the processor's
            ``image_sizes`` where it gives them, else the size the model's processor
            resized the whole image to); every view of an image gives the same size.
        kind: What the view is: ``"base"``, ``"crops"``, ``"tile"``, ``"global"`` (a
            downscaled whole image beside tiles) or ``"image"`` (the image's only view).
        name: The view's name in messages and figures; None: its ``kind``, ``"tile"`` views
            numbered in their sample's order (``"tile 0"``, ``"tile 1"``, ...).
    """

    image: int
    positions: Tensor
    grid: Tuple[int, int]
    box: Tuple[float, float, float, float]
    size: Tuple[int, int]
    kind: str
    name: Optional[str] = None

    def __post_init__(self) -> None:
        if self.positions.dim() != 1 or self.positions.numel() != self.grid[0] * self.grid[1]:
            raise ValueError(
                f"ImageView.positions must hold g_h·g_w = {self.grid[0] * self.grid[1]} "
                f"positions, got shape {tuple(self.positions.shape)}."
            )


def as_samples(per_sample: Sequence[Sequence[ImageView]]) -> List[SampleViews]:
    """The views as :class:`~captum_legrad.views.SampleViews`, one per sample: each image of
    the sample a :class:`~captum_legrad.views.Source` of its size (in order), each view's
    box rounded to whole pixels (a view of a padded copy may reach beyond the image: its
    cells over the padding lie outside the canvas and are cut off when the views are
    placed).

    Args:
        per_sample: Per row of ``input_ids``, its views in sequence order.

    Returns:
        One :class:`~captum_legrad.views.SampleViews` per sample.
    """
    out = []
    for views in per_sample:
        sizes: dict = {}
        for view in views:
            sizes.setdefault(view.image, tuple(view.size))
        local = {image: k for k, image in enumerate(sorted(sizes))}
        made, tiles = [], 0
        for view in views:
            name = view.name
            if name is None and view.kind == "tile":
                name, tiles = f"tile {tiles}", tiles + 1
            top, left, bottom, right = (round(v) for v in view.box)
            box = (top, left, bottom, right)
            source = local[view.image]
            made.append(View(view.positions.cpu(), view.grid, source, box, None, name or view.kind))
        sources = tuple(Source("image", sizes[image]) for image in sorted(sizes))
        out.append(SampleViews(sources, tuple(made)))
    return out


def in_pixels(box: Sequence[float], size: Tuple[int, int]) -> Tuple[float, float, float, float]:
    """A rectangle ``(top, left, bottom, right)`` given as fractions of an image's height and
    width, in pixels of the ``(H, W)`` image."""
    height, width = size
    top, left, bottom, right = box
    return (top * height, left * width, bottom * height, right * width)


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


def check_image_count(sizes: Optional[Sequence[Any]], found: Sequence[Sequence[ImageView]]) -> int:
    """The number of images in ``found``; raises when ``image_sizes`` (``sizes``, None: not
    given) does not give one row per image."""
    count = sum(len({v.image for v in sample}) for sample in found)
    if sizes is not None and len(sizes) != count:
        raise ValueError(
            f"image_sizes has {len(sizes)} rows but the prompts hold {count} images: give "
            "one (height, width) row per image."
        )
    return count


def tile_boxes(
    rows: int, cols: int, height: float, width: float
) -> List[Tuple[float, float, float, float]]:
    """The rectangles of a ``rows × cols`` split of a ``height × width`` image, row-major."""
    return [
        (r * height / rows, c * width / cols, (r + 1) * height / rows, (c + 1) * width / cols)
        for r in range(rows)
        for c in range(cols)
    ]


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
