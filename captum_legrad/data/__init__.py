"""Data shipped with the package: the synthetic shapes dataset and the bundled default model.

- :class:`ShapesDataset` / :func:`render_sample`: seeded cluttered images with exact object
  masks and class labels (:data:`CLASSES`).
- :func:`load_default_model`: a tiny timm ViT trained on it (``scripts/train_default_model.py``),
  loaded offline from package data.
"""

from .model import (
    DEFAULT_CONFIG,
    DEFAULT_WEIGHTS,
    build_model,
    default_model_config,
    denormalize,
    load_default_model,
    normalize,
)
from .shapes import (
    CLASSES,
    TEST_SEED,
    TRAIN_SEED,
    ShapesBatch,
    ShapesDataset,
    ShapesSample,
    collate,
    render_sample,
    shape_mask,
)

__all__ = [
    "CLASSES",
    "TEST_SEED",
    "TRAIN_SEED",
    "ShapesBatch",
    "ShapesDataset",
    "ShapesSample",
    "collate",
    "render_sample",
    "shape_mask",
    "DEFAULT_CONFIG",
    "DEFAULT_WEIGHTS",
    "build_model",
    "default_model_config",
    "denormalize",
    "load_default_model",
    "normalize",
]
