"""The shapes generator (known geometry, determinism) and the bundled default model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from captum_legrad.data import (
    CLASSES,
    DEFAULT_CONFIG,
    DEFAULT_WEIGHTS,
    TEST_SEED,
    ShapesDataset,
    default_model_config,
    denormalize,
    load_default_model,
    normalize,
    render_sample,
    shape_mask,
)


def inside(name: str, u: float, v: float) -> bool:
    return bool(shape_mask(CLASSES.index(name), np.array([u]), np.array([v]))[0])


@pytest.mark.parametrize(
    "name, yes, no",
    [
        ("circle", [(0, 0), (0.7, 0.7)], [(0.75, 0.75), (1.01, 0)]),
        ("square", [(0, 0), (0.79, -0.79)], [(0.81, 0), (0, -0.85)]),
        ("triangle", [(0, 0), (0, -0.99), (0.8, 0.49)], [(0, -1.01), (0, 0.51), (-0.6, -0.5)]),
        ("cross", [(0.9, 0), (0, -0.9), (0.29, 0.29)], [(0.5, 0.5), (0.96, 0)]),
        ("ring", [(0.6, 0), (0, -0.99)], [(0, 0), (0.3, 0.3), (1.01, 0)]),
    ],
)
def test_shape_geometry(name: str, yes: list, no: list) -> None:
    assert all(inside(name, u, v) for u, v in yes)
    assert not any(inside(name, u, v) for u, v in no)


def test_shape_areas() -> None:
    grid = np.linspace(-1, 1, 801)
    u, v = np.meshgrid(grid, grid)
    area = {name: shape_mask(i, u, v).mean() * 4 for i, name in enumerate(CLASSES)}
    assert area["circle"] == pytest.approx(math.pi, rel=0.01)
    assert area["ring"] == pytest.approx(math.pi * 0.75, rel=0.01)
    assert area["square"] == pytest.approx(1.6**2, rel=0.01)
    assert area["triangle"] == pytest.approx(3 * math.sqrt(3) / 4, rel=0.01)  # circumradius 1
    assert area["cross"] == pytest.approx(2 * 1.9 * 0.6 - 0.6**2, rel=0.01)


def test_samples_are_deterministic_and_seeded() -> None:
    a, b = render_sample(5, 3), render_sample(5, 3)
    assert torch.equal(a.image, b.image) and torch.equal(a.masks, b.masks)
    assert torch.equal(ShapesDataset(10, seed=5)[3].image, a.image)
    assert not torch.equal(render_sample(6, 3).image, a.image)
    assert not torch.equal(render_sample(5, 4).image, a.image)


def test_sample_structure() -> None:
    counts = []
    for index in range(40):
        sample = render_sample(TEST_SEED, index, max_objects=3)
        k = len(sample.labels)
        counts.append(k)
        assert sample.image.shape == (3, 64, 64) and sample.image.dtype == torch.float32
        assert 0.0 <= float(sample.image.min()) and float(sample.image.max()) <= 1.0
        assert sample.masks.shape == (k, 64, 64) and sample.masks.dtype == torch.bool
        assert len(set(sample.labels.tolist())) == k  # different classes
        assert int(sample.masks.sum(0).max()) == 1  # objects never overlap
        areas = sample.masks.flatten(1).sum(1)
        assert bool((areas > 60).all())  # radius >= 0.15 * 64
        # dark objects on a light background
        for mask in sample.masks:
            assert float(sample.image[:, mask].mean()) < 0.45
        background = ~sample.masks.any(0)
        assert float(sample.image[:, background].mean()) > 0.5
        assert sample.multi_hot().sum() == k
    assert set(counts) == {1, 2, 3}


def test_dataset_batch_and_errors() -> None:
    data = ShapesDataset(6, image_size=48)
    batch = data.batch(range(2, 5))
    assert batch.images.shape == (3, 3, 48, 48)
    assert batch.targets.shape == (3, len(CLASSES))
    assert torch.equal(batch.images[0], data[2].image)
    with pytest.raises(IndexError):
        data[6]
    with pytest.raises(ValueError, match="max_objects"):
        render_sample(0, 0, max_objects=9)


def test_normalize_round_trip() -> None:
    images = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(denormalize(normalize(images)), images)


def test_default_model_files_and_config() -> None:
    assert DEFAULT_WEIGHTS.is_file() and DEFAULT_CONFIG.is_file()
    assert DEFAULT_WEIGHTS.stat().st_size < 4_000_000
    config = default_model_config()
    assert config == json.loads(DEFAULT_CONFIG.read_text())
    assert config["classes"] == list(CLASSES)
    assert config["model_kwargs"]["patch_size"] == 8
    assert config["heldout"]["top1_accuracy"] >= 0.9


def test_default_model_classifies_a_fixed_batch() -> None:
    """The shipped weights: top-1 (the arg-max is a present class) >= 95 % and every label
    right (multi-label, logit > 0) >= 75 % on the first 64 held-out images."""
    model = load_default_model()
    assert not model.training
    batch = ShapesDataset(64, seed=TEST_SEED).batch(range(64))
    with torch.no_grad():
        logits = model(normalize(batch.images))
    truth = batch.targets > 0.5
    top1 = truth.gather(1, logits.argmax(1, keepdim=True)).float().mean()
    exact = ((logits > 0) == truth).all(1).float().mean()
    assert float(top1) >= 0.95
    assert float(exact) >= 0.75
