"""How a photo becomes a model's input, and how a map goes back onto the photo.

A model's evaluation preprocessing is described by a :class:`View`: resize (the shortest
edge to a length, the longest edge to a length, or both edges to an exact size), then a
centre crop of the model's input size. ``View.geometry(height, width)`` gives, for one
photo, the :class:`Geometry` of that preprocessing: the resized size and the crop's
offset. :meth:`Geometry.project` puts a map computed on the model's input back onto the
photo at its own resolution and aspect ratio, with ``NaN`` where the photo was cropped
away (the model never saw those pixels, so they are not explained).

The rounding follows torchvision's ``Resize`` (shortest edge: the long edge becomes
``int(size * long / short)``) and ``CenterCrop`` (offset ``int(round((resized - crop) /
2))``; an input smaller than the crop is padded evenly), which timm, OpenCLIP and
torchvision's weight presets use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["View", "Geometry"]

Size = Tuple[int, int]


def _crop_offset(resized: int, crop: int) -> int:
    if resized < crop:  # CenterCrop pads (crop - resized) // 2 before, the rest after
        return -((crop - resized) // 2)
    return round((resized - crop) / 2.0)


@dataclass(frozen=True)
class Geometry:
    """One photo's preprocessing: ``photo`` ``(h, w)`` → ``resized`` → crop ``(H, W)``.

    Attributes:
        photo: The photo's size ``(h, w)``.
        resized: Its size after resizing ``(h', w')``.
        offset: The crop's top-left corner ``(top, left)`` in the resized photo (negative
                    where the crop is larger and the photo is padded).
        crop: The model's input size ``(H, W)``.
    """

    photo: Size
    resized: Size
    offset: Size
    crop: Size

    def coordinates(self) -> Tuple[Tensor, Tensor]:
        """Where the centre of each photo row / column lies in the crop, in crop pixels.

        Returns ``(rows (h,), columns (w,))``: a photo pixel ``(y, x)`` has its centre at
        ``(y + 0.5) * h' / h - top`` rows from the crop's top edge (and the same for
        columns); it lies inside the crop when that is in ``[0, H)``.
        """
        out = []
        for axis in range(2):
            n, resized, start = self.photo[axis], self.resized[axis], self.offset[axis]
            centres = (torch.arange(n, dtype=torch.float64) + 0.5) * (resized / n)
            out.append(centres - start)
        return out[0], out[1]

    def inside(self) -> Tensor:
        """``(h, w)`` bool: the photo pixels the model saw (their centres lie in the crop)."""
        rows, cols = self.coordinates()
        in_rows = (rows >= 0) & (rows < self.crop[0])
        in_cols = (cols >= 0) & (cols < self.crop[1])
        return in_rows[:, None] & in_cols[None, :]

    def project(self, maps: Tensor) -> Tensor:
        """Maps on the model's input ``(K, H, W)`` → the photo ``(K, h, w)``.

        Each photo pixel takes the bilinear interpolation of the map at its centre's
        position in the crop (``align_corners=False`` convention, edges clamped); pixels
        outside the crop are ``NaN``.
        """
        if maps.dim() != 3 or tuple(maps.shape[-2:]) != tuple(self.crop):
            raise ValueError(
                f"maps must be (K, {self.crop[0]}, {self.crop[1]}), got {tuple(maps.shape)}"
            )
        rows, cols = self.coordinates()
        gy = (2 * rows / self.crop[0] - 1).float()
        gx = (2 * cols / self.crop[1] - 1).float()
        grid = torch.stack(torch.broadcast_tensors(gx[None, :], gy[:, None]), dim=-1)
        values = maps.detach().float().cpu()[:, None]
        grid = grid[None].expand(values.shape[0], -1, -1, -1)
        out = F.grid_sample(
            values, grid, mode="bilinear", padding_mode="border", align_corners=False
        )
        out = out[:, 0]
        out[:, ~self.inside()] = float("nan")
        return out


@dataclass(frozen=True)
class View:
    """A model's evaluation preprocessing: resize, then centre-crop to ``crop``.

    Attributes:
        crop: The model's input size ``(H, W)``.
        resize: ``"shortest"`` (the shorter edge becomes ``size[0]``, aspect kept),
                    ``"longest"`` (the longer edge becomes ``size[0]``, aspect kept, the
                    crop pads) or ``"exact"`` (the photo is stretched to ``size``).
        size: The resize target (see ``resize``).
    """

    crop: Size
    resize: str = "shortest"
    size: Size = (0, 0)

    def __post_init__(self) -> None:
        if self.resize not in ("shortest", "longest", "exact"):
            raise ValueError(f"resize must be shortest, longest or exact, got {self.resize!r}")
        if self.size == (0, 0):
            object.__setattr__(self, "size", tuple(self.crop))

    def resized(self, height: int, width: int) -> Size:
        """The size ``(h', w')`` a ``(height, width)`` photo is resized to."""
        if self.resize == "exact":
            return int(self.size[0]), int(self.size[1])
        edge = int(self.size[0])
        short, long = sorted((height, width))
        if self.resize == "shortest":
            new_short, new_long = edge, int(edge * long / short)
        else:
            new_long, new_short = edge, max(1, round(edge * short / long))
        return (new_short, new_long) if height <= width else (new_long, new_short)

    def geometry(self, height: int, width: int) -> Geometry:
        """The :class:`Geometry` of a ``(height, width)`` photo."""
        resized = self.resized(height, width)
        offset = (_crop_offset(resized[0], self.crop[0]), _crop_offset(resized[1], self.crop[1]))
        return Geometry(photo=(height, width), resized=resized, offset=offset, crop=self.crop)

    def apply(self, image: Tensor) -> Tensor:
        """Resize (bilinear, antialiased), then crop a ``(3, h, w)`` image in [0, 1] (pad: 0)."""
        geometry = self.geometry(int(image.shape[-2]), int(image.shape[-1]))
        if tuple(image.shape[-2:]) != geometry.resized:
            image = F.interpolate(
                image[None],
                size=geometry.resized,
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )[0].clamp(0, 1)
        top, left = geometry.offset
        height, width = self.crop
        pad = (
            max(0, -left),
            max(0, left + width - image.shape[-1]),
            max(0, -top),
            max(0, top + height - image.shape[-2]),
        )
        if any(pad):
            image = F.pad(image, pad)
            top, left = max(top, 0), max(left, 0)
        return image[:, top : top + height, left : left + width]
