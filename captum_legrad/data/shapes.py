"""A seeded synthetic localisation dataset with exact masks: shapes on textured clutter.

Every image holds one or more objects of different classes (:data:`CLASSES`: circle, square,
triangle, cross, ring), each a solid, dark, randomly coloured, slightly rotated shape of random
size and position, on a light background of smooth colour noise with thin line segments and
dots in random mid-to-light colours as clutter. Objects never overlap and are drawn last, so
each object's mask is exactly the set of pixels it covers.

Image ``i`` of a dataset depends only on ``(seed, i)`` and the size options, so any subset,
shard or batch of a dataset is reproducible on its own (distributed evaluation generates
only its shard).

Examples::

    >>> from captum_legrad.data import ShapesDataset
    >>> data = ShapesDataset(8, seed=1)
    >>> sample = data[0]
    >>> sample.image.shape, sample.masks.shape, sample.labels.shape  # doctest: +SKIP
    (torch.Size([3, 64, 64]), torch.Size([2, 64, 64]), torch.Size([2]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CLASSES",
    "TRAIN_SEED",
    "TEST_SEED",
    "ShapesSample",
    "ShapesBatch",
    "ShapesDataset",
    "render_sample",
    "shape_mask",
]

#: Object classes, in the order of the class indices.
CLASSES: Tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring")

#: Seed of the training split (``scripts/train_default_model.py``).
TRAIN_SEED = 0
#: Seed of the held-out split used for all reported numbers.
TEST_SEED = 1

# Triangle edge normals (apex up in image coordinates, circumradius 1, inradius 0.5).
_TRIANGLE_NORMALS = np.array(
    [[0.0, 1.0], [-math.sqrt(3) / 2, -0.5], [math.sqrt(3) / 2, -0.5]], dtype=np.float64
)


@dataclass(frozen=True)
class ShapesSample:
    """One generated image.

    Attributes:
        image: ``(3, H, W)`` float32 RGB in [0, 1].
        masks: ``(K, H, W)`` bool, one exact mask per object.
        labels: ``(K,)`` long, the class index of each object (all different).
    """

    image: Tensor
    masks: Tensor
    labels: Tensor

    def multi_hot(self, num_classes: int = len(CLASSES)) -> Tensor:
        """``(num_classes,)`` float vector with 1 for every class present."""
        target = torch.zeros(num_classes)
        target[self.labels] = 1.0
        return target


@dataclass(frozen=True)
class ShapesBatch:
    """Several samples collated: ``images`` ``(B, 3, H, W)``, ``targets`` ``(B, C)`` multi-hot."""

    images: Tensor
    targets: Tensor
    samples: Tuple[ShapesSample, ...]


def shape_mask(cls: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test of shape ``cls`` in object coordinates (``u, v`` scaled by the size).

    The shapes fit in the unit disc: circle (radius 1), square (half side 0.8), equilateral
    triangle (circumradius 1, apex up), cross (arms 0.95 long, 0.3 half-width) and ring
    (radii 0.5 to 1).
    """
    name = CLASSES[cls]
    if name == "circle":
        return np.asarray(u * u + v * v <= 1.0)
    if name == "square":
        return np.asarray(np.maximum(np.abs(u), np.abs(v)) <= 0.8)
    if name == "triangle":
        inside = np.ones(u.shape, dtype=bool)
        for n_u, n_v in _TRIANGLE_NORMALS:
            inside &= n_u * u + n_v * v <= 0.5
        return inside
    if name == "cross":
        au, av = np.abs(u), np.abs(v)
        return np.asarray(((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95)))
    if name == "ring":
        r2 = u * u + v * v
        return np.asarray((r2 <= 1.0) & (r2 >= 0.25))
    raise ValueError(f"unknown shape class {cls}")


def _upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of ``(C, g, g)`` to ``(C, size, size)`` (align_corners=False)."""
    g = grid.shape[-1]
    pos = np.clip((np.arange(size) + 0.5) * g / size - 0.5, 0, g - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, g - 1)
    w = pos - lo
    rows = grid[:, lo, :] * (1 - w)[None, :, None] + grid[:, hi, :] * w[None, :, None]
    return np.asarray(rows[:, :, lo] * (1 - w) + rows[:, :, hi] * w)


def _segment_mask(
    xs: np.ndarray, ys: np.ndarray, p0: np.ndarray, p1: np.ndarray, width: float
) -> np.ndarray:
    d = p1 - p0
    t = np.clip(((xs - p0[0]) * d[0] + (ys - p0[1]) * d[1]) / max(float(d @ d), 1e-9), 0, 1)
    dx, dy = xs - (p0[0] + t * d[0]), ys - (p0[1] + t * d[1])
    return np.asarray(dx * dx + dy * dy <= width * width)


def _place(rng: np.random.Generator, count: int, size: int) -> List[Tuple[float, float, float]]:
    """``count`` non-overlapping discs ``(x, y, r)`` inside the image (fewer if none fit)."""
    while True:
        for _attempt in range(100):
            radii = rng.uniform(0.15, 0.24, count) * size
            centres = rng.uniform(radii[:, None] + 1, size - radii[:, None] - 1, (count, 2))
            placed = [(float(x), float(y), float(r)) for (x, y), r in zip(centres, radii)]
            if all(
                math.hypot(a[0] - b[0], a[1] - b[1]) > a[2] + b[2] + 2
                for i, a in enumerate(placed)
                for b in placed[i + 1 :]
            ):
                return placed
        count -= 1


def render_sample(
    seed: int,
    index: int,
    *,
    image_size: int = 64,
    max_objects: int = 2,
) -> ShapesSample:
    """Generate image ``index`` of the dataset with seed ``seed``.

    Args:
        seed (int): Dataset seed (:data:`TRAIN_SEED`, :data:`TEST_SEED`, ...).
        index (int): Image index; the image depends only on ``(seed, index)`` and the options.
        image_size (int, optional): Height and width in pixels.
                    Default: 64
        max_objects (int, optional): Each image has 1 to ``max_objects`` objects (uniformly),
                    of different classes, at most ``len(CLASSES)``.
                    Default: 2

    Returns:
        A :class:`ShapesSample`.
    """
    if not 1 <= max_objects <= len(CLASSES):
        raise ValueError(f"max_objects must be in 1..{len(CLASSES)}, got {max_objects}.")
    rng = np.random.default_rng([seed, index])
    size = image_size
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5

    # Background: a light base colour, smooth colour noise, pixel noise.
    base = rng.uniform(0.55, 0.85, 3)
    image = base[:, None, None] + _upsample(rng.normal(0.0, 0.12, (3, 5, 5)), size)
    image = image + rng.normal(0.0, 0.03, (3, size, size))

    # Clutter: thin segments and small dots in random colours.
    for _ in range(int(rng.integers(3, 8))):
        p0 = rng.uniform(0, size, 2)
        length = rng.uniform(0.1, 0.3) * size
        angle = rng.uniform(0, 2 * math.pi)
        p1 = p0 + length * np.array([math.cos(angle), math.sin(angle)])
        region = _segment_mask(xs, ys, p0, p1, rng.uniform(0.5, 1.0) * size / 64)
        image[:, region] = rng.uniform(0.3, 1.0, 3)[:, None]
    for _ in range(int(rng.integers(1, 5))):
        c = rng.uniform(0, size, 2)
        radius = rng.uniform(1.0, 2.5) * size / 64
        region = (xs - c[0]) ** 2 + (ys - c[1]) ** 2 <= radius * radius
        image[:, region] = rng.uniform(0.3, 1.0, 3)[:, None]

    # Objects: different classes, non-overlapping discs, fully inside the image.
    count = int(rng.integers(1, max_objects + 1))
    classes = rng.permutation(len(CLASSES))[:count]
    placed = _place(rng, count, size)
    classes = classes[: len(placed)]
    masks = []
    for cls, (cx, cy, radius) in zip(classes, placed):
        angle = rng.uniform(-0.35, 0.35)
        cos, sin = math.cos(angle), math.sin(angle)
        u = ((xs - cx) * cos + (ys - cy) * sin) / radius
        v = (-(xs - cx) * sin + (ys - cy) * cos) / radius
        mask = shape_mask(int(cls), u, v)
        color = rng.uniform(0.0, 0.4, 3)
        image[:, mask] = (color[:, None] + rng.normal(0.0, 0.03, (3, int(mask.sum())))).astype(
            np.float64
        )
        masks.append(mask)
    return ShapesSample(
        image=torch.from_numpy(np.clip(image, 0.0, 1.0).astype(np.float32)),
        masks=torch.from_numpy(np.stack(masks)),
        labels=torch.from_numpy(classes.astype(np.int64)),
    )


class ShapesDataset(torch.utils.data.Dataset):
    r"""``num_images`` generated images with exact object masks (see the module docstring).

    Args:
        num_images (int): Number of images.
        seed (int, optional): Dataset seed; :data:`TEST_SEED` is the held-out split all
                    reported numbers use, :data:`TRAIN_SEED` the training split.
                    Default: TEST_SEED
        image_size (int, optional): Height and width in pixels.
                    Default: 64
        max_objects (int, optional): 1 to ``max_objects`` objects per image.
                    Default: 2

    Examples::

        >>> data = ShapesDataset(16)
        >>> batch = data.batch(range(4))
        >>> batch.images.shape, batch.targets.shape
        (torch.Size([4, 3, 64, 64]), torch.Size([4, 5]))
    """

    classes: Tuple[str, ...] = CLASSES

    def __init__(
        self,
        num_images: int,
        *,
        seed: int = TEST_SEED,
        image_size: int = 64,
        max_objects: int = 2,
    ) -> None:
        if num_images < 0:
            raise ValueError(f"num_images must be >= 0, got {num_images}.")
        self.num_images = num_images
        self.seed = seed
        self.image_size = image_size
        self.max_objects = max_objects

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> ShapesSample:
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        return render_sample(
            self.seed, index, image_size=self.image_size, max_objects=self.max_objects
        )

    def batch(self, indices: Iterable[int]) -> ShapesBatch:
        """Generate and collate the images at ``indices``."""
        return collate([self[i] for i in indices])


def collate(samples: Sequence[ShapesSample]) -> ShapesBatch:
    """Stack samples into a :class:`ShapesBatch`."""
    return ShapesBatch(
        images=torch.stack([s.image for s in samples]),
        targets=torch.stack([s.multi_hot() for s in samples]),
        samples=tuple(samples),
    )
