"""Captum's consumers take LeGrad's output as it comes: NoiseTunnel, metrics, visualisation.

Every test re-computes what Captum computed, from the same random draws, with plain LeGrad
calls and the formulas Captum documents.
"""

from __future__ import annotations

import importlib.util
from typing import Callable, Tuple

import numpy as np
import pytest
import torch
from captum.attr import NoiseTunnel
from captum.attr import visualization as viz
from captum.metrics import infidelity, sensitivity_max
from conftest import make_model
from torch import Tensor

from captum_legrad import LeGrad

pytest.importorskip("matplotlib")

TARGETS = [1, 3]


@pytest.fixture(scope="module")
def legrad() -> LeGrad:
    return LeGrad(make_model("vit"))


def batch(n: int = 2, seed: int = 1) -> Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("nt_type", ["smoothgrad", "smoothgrad_sq", "vargrad"])
def test_noise_tunnel_equals_statistics_over_the_same_noisy_inputs(
    legrad: LeGrad, nt_type: str
) -> None:
    x, n, stdev = batch(), 4, 0.3
    torch.manual_seed(123)
    got = NoiseTunnel(legrad).attribute(
        x, nt_type=nt_type, nt_samples=n, stdevs=stdev, target=TARGETS
    )
    # The same draws NoiseTunnel makes: N(0, stdev) for every element of the repeated batch.
    torch.manual_seed(123)
    noise = torch.normal(0, torch.tensor(stdev).repeat((2 * n, 3, 32, 32)))
    noisy = x.repeat_interleave(n, dim=0) + noise
    per_sample = legrad.attribute(noisy, target=torch.tensor(TARGETS).repeat_interleave(n))
    per_sample = per_sample.view(2, n, 3, 32, 32)
    mean, mean_sq = per_sample.mean(1), per_sample.pow(2).mean(1)
    expected = {"smoothgrad": mean, "smoothgrad_sq": mean_sq, "vargrad": mean_sq - mean**2}
    assert isinstance(got, Tensor) and got.shape == x.shape
    torch.testing.assert_close(got, expected[nt_type], rtol=1e-5, atol=1e-6)
    assert not torch.equal(got, legrad.attribute(x, target=TARGETS))  # the noise mattered


def test_noise_tunnel_keeps_tuples_and_options(legrad: LeGrad) -> None:
    x = batch()
    torch.manual_seed(0)
    got = NoiseTunnel(legrad).attribute(
        (x,), nt_type="smoothgrad", nt_samples=2, stdevs=0.1, target=2, output="map"
    )
    assert isinstance(got, tuple) and got[0].shape == (2, 1, 32, 32)
    assert float(got[0].min()) >= 0.0 and float(got[0].max()) <= 1.0


def make_perturb(seed: int, scale: float = 0.1) -> Callable[[Tensor], Tuple[Tensor, Tensor]]:
    """Gaussian perturbations I from a fixed generator: returns (I, x - I)."""
    gen = torch.Generator().manual_seed(seed)

    def perturb(inputs: Tensor) -> Tuple[Tensor, Tensor]:
        noise = torch.randn(inputs.shape, generator=gen) * scale
        return noise, inputs - noise

    return perturb


def test_infidelity_takes_legrad_as_it_comes_and_matches_its_formula(legrad: LeGrad) -> None:
    model, x, n = legrad.forward_func, batch(), 8
    target = torch.tensor(TARGETS)
    attr = legrad.attribute(x, target=target)  # the input's shape, as infidelity requires
    got = infidelity(
        model, make_perturb(0), x, attr, target=target, n_perturb_samples=n, normalize=True
    )
    assert got.shape == (2,) and bool(torch.isfinite(got).all()) and bool((got >= 0).all())

    # infidelity = E[(beta * I.attr - (f(x) - f(x - I)))^2], beta the least-squares scale
    noise, perturbed = make_perturb(0)(x.repeat_interleave(n, dim=0))
    rows = torch.arange(2 * n)
    with torch.no_grad():
        fx = model(x)[torch.arange(2), target].repeat_interleave(n)
        fp = model(perturbed)[rows, target.repeat_interleave(n)]
    diff = (fx - fp).view(2, n).double()
    dot = (attr.repeat_interleave(n, dim=0) * noise).flatten(1).sum(1).view(2, n).double()
    beta = (dot * diff).sum(1) / (dot * dot).sum(1)
    expected = ((beta[:, None] * dot - diff) ** 2).mean(1)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-8)


def test_sensitivity_max_matches_recomputation(legrad: LeGrad) -> None:
    x, n, radius = batch(), 4, 0.05
    torch.manual_seed(5)
    got = sensitivity_max(
        legrad.attribute, x, target=TARGETS, n_perturb_samples=n, perturb_radius=radius
    )
    assert got.shape == (2,) and bool(torch.isfinite(got).all()) and bool((got > 0).all())

    # The same draws as Captum's default perturbation: uniform in the L-inf ball.
    torch.manual_seed(5)
    delta = torch.empty(2 * n, 3, 32, 32).uniform_(-radius, radius)
    base = legrad.attribute(x, target=TARGETS)
    moved = legrad.attribute(
        x.repeat_interleave(n, dim=0) + delta, target=torch.tensor(TARGETS).repeat_interleave(n)
    )
    change = (moved - base.repeat_interleave(n, dim=0)).flatten(1).norm(dim=1)
    expected = (change / base.flatten(1).norm(dim=1).repeat_interleave(n)).view(2, n).amax(1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def image_hwc(x: Tensor) -> np.ndarray:
    """One image as Captum's visualiser wants it: channels-last, in [0, 1]."""
    return ((x - x.min()) / (x.max() - x.min())).permute(1, 2, 0).numpy()


@pytest.mark.parametrize("output", ["input", "map"])
def test_visualize_image_attr_draws_the_map(legrad: LeGrad, output: str) -> None:
    x = batch(1)
    attr = legrad.attribute(x, target=2, output=output)
    hwc = attr[0].permute(1, 2, 0).numpy()  # (H, W, 3) or (H, W, 1): channels last
    fig, ax = viz.visualize_image_attr(
        hwc,
        image_hwc(x[0]),
        method="blended_heat_map",
        sign="positive",
        outlier_perc=0,
        use_pyplot=False,
    )
    assert fig is ax.figure and len(ax.images) == 2  # grey image, then the heat map
    # Captum sums the channels and divides by the maximum: LeGrad's [0, 1] map comes back.
    drawn = np.asarray(ax.images[-1].get_array())
    np.testing.assert_allclose(drawn, attr[0, 0].numpy(), rtol=1e-5, atol=1e-6)


def test_visualize_image_attr_multiple(legrad: LeGrad) -> None:
    x = batch(1)
    attr = legrad.attribute(x, target=4)
    methods = ["original_image", "heat_map", "blended_heat_map", "masked_image", "alpha_scaling"]
    fig, axes = viz.visualize_image_attr_multiple(
        attr[0].permute(1, 2, 0).numpy(),
        image_hwc(x[0]),
        methods=methods,
        signs=["all"] + ["positive"] * 4,
        titles=methods,
        outlier_perc=0,
        use_pyplot=False,
    )
    assert len(axes) == len(methods) and [ax.get_title() for ax in axes] == methods
    heat = np.asarray(axes[1].images[-1].get_array())
    np.testing.assert_allclose(heat, attr[0, 0].numpy(), rtol=1e-5, atol=1e-6)
    # masked_image: the image in 0..255 integers times the map, cut to integers again
    masked = np.asarray(axes[3].images[-1].get_array(), dtype=np.float64)
    pixels = np.clip((image_hwc(x[0]) * 255).astype(int), 0, 255)
    expected = np.clip(pixels * attr[0, 0].numpy()[..., None], 0, 255).astype(int)
    np.testing.assert_allclose(masked, expected, rtol=0, atol=1)
    fig.clear()


@pytest.mark.skipif(
    importlib.util.find_spec("captum.insights") is not None,
    reason="this captum still has Insights (tests/insights covers it)",
)
def test_insights_register_explains_how_to_get_insights() -> None:
    from captum_legrad import insights

    with pytest.raises(ImportError, match=r"insights.*captum==0\.8\.0"):
        insights.register()
