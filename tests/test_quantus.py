"""Quantus metrics on LeGrad maps through ``captum_legrad.quantus.explain_func``, on the
bundled shapes model: a faithfulness metric (pixel flipping) and a localisation metric
(relevance rank accuracy against the exact object masks of the shapes dataset)."""

from __future__ import annotations

import os
from typing import Any, Tuple

import numpy as np
import pytest
import torch

quantus = pytest.importorskip("quantus")
os.environ.setdefault("PYTEST", "1")  # Quantus: no progress bars, fewer warnings

from captum_legrad import LeGrad  # noqa: E402
from captum_legrad.data import ShapesDataset, load_default_model, normalize  # noqa: E402
from captum_legrad.quantus import explain_func  # noqa: E402

N = 16


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return load_default_model()


@pytest.fixture(scope="module")
def batch() -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised images, the class of each sample's first object and that object's mask."""
    data = ShapesDataset(N)
    samples = [data[i] for i in range(N)]
    x = normalize(torch.stack([s.image for s in samples])).numpy()
    y = np.array([int(s.labels[0]) for s in samples])
    masks = np.stack([s.masks[:1].numpy() for s in samples]).astype(np.float32)
    return x, y, masks


def random_maps(model: Any, inputs: np.ndarray, targets: np.ndarray, **kwargs: Any) -> np.ndarray:
    """A random-map explain_func: the baseline a localisation score must beat."""
    rng = np.random.default_rng(0)
    return rng.random((inputs.shape[0], 1, *inputs.shape[2:])).astype(np.float32)


def test_explain_func_is_legrad_in_numpy(model: torch.nn.Module, batch: tuple) -> None:
    x, y, _ = batch
    maps = explain_func(model, x[:4], y[:4], device="cpu", layers=[-2, -1])
    expected = LeGrad(model, layers=[-2, -1]).attribute(
        torch.from_numpy(x[:4]), target=torch.from_numpy(y[:4]), output="map"
    )
    assert isinstance(maps, np.ndarray) and maps.dtype == np.float32
    assert maps.shape == (4, 1, 64, 64)
    np.testing.assert_allclose(maps, expected.numpy(), atol=1e-6)
    # options through keywords; the Quantus keywords are accepted, torch inputs too
    grid = explain_func(model, torch.from_numpy(x[:2]), y[:2], output="grid", normalize=False)
    assert grid.shape == (2, 1, 8, 8)
    full = explain_func(model, x[:2], y[:2], output="input", method="LeGrad", reduce_axes=(1,))
    assert full.shape == (2, 3, 64, 64)
    last = explain_func(model, x[:2], int(y[0]), pooling="model", interpolate_mode="nearest")
    np.testing.assert_allclose(
        last,
        LeGrad(model, pooling="model")
        .attribute(
            torch.from_numpy(x[:2]), target=int(y[0]), output="map", interpolate_mode="nearest"
        )
        .numpy(),
        atol=1e-6,
    )
    # channel-last inputs give channel-last maps
    last_axis = explain_func(
        model, x[:4].transpose(0, 2, 3, 1), y[:4], channel_first=False, layers=[-2, -1]
    )
    np.testing.assert_allclose(last_axis, maps.transpose(0, 2, 3, 1), atol=1e-6)


def test_explain_func_refuses_what_it_cannot_honour(model: torch.nn.Module, batch: tuple) -> None:
    x, y, _ = batch
    with pytest.raises(TypeError, match="layer"):
        explain_func(model, x[:1], y[:1], layer=[-1])  # a typo of layers
    with pytest.raises(ValueError, match="softmax"):
        explain_func(model, x[:1], y[:1], softmax=True)


def test_faithfulness_pixel_flipping(model: torch.nn.Module, batch: tuple) -> None:
    x, y, _ = batch
    metric = quantus.PixelFlipping(
        features_in_step=256,  # a divisor of the 64 x 64 pixels
        perturb_baseline="black",
        disable_warnings=True,
        display_progressbar=False,
    )
    curves = metric(
        model=model,
        x_batch=x[:4],
        y_batch=y[:4],
        explain_func=explain_func,
        explain_func_kwargs={"layers": [-2, -1]},
        device="cpu",
    )
    curves = np.asarray(curves, dtype=np.float64)
    assert curves.ndim == 2 and curves.shape[0] == 4 and curves.shape[1] >= 16
    assert np.isfinite(curves).all()
    assert np.ptp(curves, axis=1).min() > 0  # flipping pixels changed the predictions


def test_localisation_beats_random_maps(model: torch.nn.Module, batch: tuple) -> None:
    x, y, masks = batch
    scores = {}
    for name, func in (("legrad", explain_func), ("random", random_maps)):
        metric = quantus.RelevanceRankAccuracy(disable_warnings=True, display_progressbar=False)
        result = metric(
            model=model,
            x_batch=x,
            y_batch=y,
            s_batch=masks,
            explain_func=func,
            device="cpu",
        )
        values = np.asarray(result, dtype=np.float64)
        assert values.shape == (N,) and np.isfinite(values).all()
        scores[name] = float(values.mean())
    # a random map puts about the mask's area share of its top pixels inside the mask
    assert scores["random"] < 0.15
    assert scores["legrad"] > 2 * scores["random"], scores
