"""The Captum surface: identity, target forms, output modes, batching, multi-target."""

from __future__ import annotations

import inspect

import pytest
import torch
from captum.attr import GradientAttribution
from conftest import make_model
from oracle import oracle_legrad

import captum_legrad
from captum_legrad import LeGrad


def test_public_names() -> None:
    for name in ("LeGrad", "discover", "ViTSpec", "UnsupportedModelError"):
        assert hasattr(captum_legrad, name)
    assert issubclass(captum_legrad.UnsupportedModelError, TypeError)


def test_captum_identity(vit: torch.nn.Module) -> None:
    legrad = LeGrad(vit)
    assert isinstance(legrad, GradientAttribution)
    assert LeGrad.get_name() == "LeGrad"
    assert legrad.has_convergence_delta() is False
    assert legrad.multiplies_by_inputs is False
    # log_usage keeps the wrapped function: NoiseTunnel, Insights and TCAV call __wrapped__.
    wrapped = legrad.attribute.__wrapped__  # type: ignore[attr-defined]
    assert "target" in inspect.signature(wrapped).parameters
    assert "baselines" not in inspect.signature(legrad.attribute).parameters
    with pytest.raises(NotImplementedError):
        legrad.attribute_future()


def test_wrapped_call_equals_attribute(vit: torch.nn.Module, images) -> None:
    legrad, x = LeGrad(vit), images()
    direct = legrad.attribute(x, target=1)
    via = LeGrad.attribute.__wrapped__(legrad, x, target=1)  # type: ignore[attr-defined]
    assert torch.equal(direct, via)


def test_output_modes(vit: torch.nn.Module, images) -> None:
    legrad, x = LeGrad(vit), images(2)
    full = legrad.attribute(x, target=1)
    heat = legrad.attribute(x, target=1, output="map")
    grid = legrad.attribute(x, target=1, output="grid")
    assert full.shape == x.shape and heat.shape == (2, 1, 32, 32) and grid.shape == (2, 1, 4, 4)
    assert torch.equal(full, heat.expand_as(x))
    raw = legrad.attribute(x, target=1, output="grid", normalize=False)
    per_layer = legrad.attribute_layers(x, target=1)
    assert per_layer.shape == (2, 3, 4, 4)
    torch.testing.assert_close(raw, per_layer.sum(1, keepdim=True), rtol=0, atol=0)
    for out in (full, heat, grid):
        assert not out.requires_grad and out.device == x.device
        flat = out.flatten(1)
        assert torch.all(flat.amin(1) == 0) and torch.all(flat.amax(1) == 1)


def test_tuple_in_tuple_out(vit: torch.nn.Module, images) -> None:
    x = images(2)
    single = LeGrad(vit).attribute(x, target=2)
    as_tuple = LeGrad(vit).attribute((x,), target=2)
    assert isinstance(single, torch.Tensor)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    assert torch.equal(as_tuple[0], single)


class _Scaled(torch.nn.Module):
    """A forward taking an extra input and an additional forward argument."""

    def __init__(self, vit: torch.nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, x: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
        return self.vit(x) * scale + bias.sum()


def test_additional_forward_args_and_extra_inputs(vit: torch.nn.Module, images) -> None:
    x, bias = images(2), torch.ones(2, 4)
    calls = []
    wrapper = _Scaled(vit)
    wrapper.register_forward_hook(lambda m, args, out: calls.append(args[2]))
    attr = LeGrad(wrapper).attribute((x, bias), target=1, additional_forward_args=(3.0,))
    assert calls == [3.0]
    assert isinstance(attr, tuple) and len(attr) == 2
    assert torch.equal(attr[0], LeGrad(vit).attribute(x, target=1))
    assert torch.equal(attr[1], torch.zeros_like(bias))


@pytest.mark.parametrize(
    "target",
    [3, (3,), torch.tensor(3), torch.tensor([3]), [3, 3], torch.tensor([3, 3]), [(3,), (3,)]],
    ids=["int", "tuple", "0d", "1elem", "list", "tensor", "list_of_tuples"],
)
def test_same_class_target_forms(vit: torch.nn.Module, images, target: object) -> None:
    x = images(2)
    expected = oracle_legrad(vit, x, torch.tensor([3, 3]))
    got = LeGrad(vit).attribute(x, target=target, output="map")  # type: ignore[arg-type]
    assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "target", [[1, 4], torch.tensor([1, 4]), [(1,), (4,)]], ids=["list", "tensor", "tuples"]
)
def test_per_sample_targets(vit: torch.nn.Module, images, target: object) -> None:
    x = images(2)
    expected = oracle_legrad(vit, x, torch.tensor([1, 4]))
    got = LeGrad(vit).attribute(x, target=target, output="map")  # type: ignore[arg-type]
    assert (got - expected).abs().max() <= 1e-5


def test_target_none_for_single_score(images) -> None:
    model = make_model("vit", num_classes=1)
    x = images(2)
    got = LeGrad(model).attribute(x, output="map")
    assert (got - oracle_legrad(model, x, torch.tensor([0, 0]))).abs().max() <= 1e-5


def test_batch_equivalence(model_key: str) -> None:
    model = make_model(model_key)
    size = (32, 48) if model_key == "vit_dynamic" else (32, 32)
    x = torch.randn(4, 3, *size, generator=torch.Generator().manual_seed(11))
    target = torch.tensor([0, 3, 3, 1])
    legrad = LeGrad(model)
    batched = legrad.attribute(x, target=target, output="map")
    for i in range(4):
        alone = legrad.attribute(x[i : i + 1], target=int(target[i]), output="map")
        assert (batched[i] - alone[0]).abs().max() <= 1e-5


@pytest.mark.parametrize("key", ["vit", "siglip_map"])
def test_attribute_multi_equals_single_calls(key: str, images) -> None:
    model = make_model(key)
    x, targets = images(2), [4, 0, 2]
    legrad = LeGrad(model, [-2, -1])
    multi = legrad.attribute_multi(x, targets=targets)
    assert multi.shape == (2, 3, 32, 32)
    for k, t in enumerate(targets):
        single = legrad.attribute(x, target=t, output="map")
        assert (multi[:, k : k + 1] - single).abs().max() <= 1e-5
    grid = legrad.attribute_multi(x, targets=torch.tensor(targets), output="grid")
    assert grid.shape == (2, 3, 4, 4)
    full = legrad.attribute_multi(x, targets=targets, output="input")
    assert full.shape == (2, 3, 3, 32, 32)
    assert torch.equal(full[:, 1, 2], multi[:, 1])


def test_attribute_multi_per_sample_targets(vit: torch.nn.Module, images) -> None:
    x = images(2)
    table = torch.tensor([[1, 2], [3, 0]])
    multi = LeGrad(vit).attribute_multi(x, targets=table)
    for k in range(2):
        single = LeGrad(vit).attribute(x, target=table[:, k], output="map")
        assert (multi[:, k : k + 1] - single).abs().max() <= 1e-5


def test_works_under_outer_no_grad(vit: torch.nn.Module, images) -> None:
    x = images(2)
    expected = LeGrad(vit).attribute(x, target=1)
    with torch.no_grad():
        got = LeGrad(vit).attribute(x, target=1)
    assert torch.equal(got, expected)
    assert torch.is_grad_enabled()


def test_grad_mode_is_restored(vit: torch.nn.Module, images) -> None:
    with torch.no_grad():
        LeGrad(vit).attribute(images(1), target=1)
        assert not torch.is_grad_enabled()
    LeGrad(vit).attribute(images(1), target=1)
    assert torch.is_grad_enabled()


def test_input_requiring_grad_is_left_alone(vit: torch.nn.Module, images) -> None:
    x = images(2).requires_grad_()
    out = LeGrad(vit).attribute(x, target=1)
    assert x.grad is None and x.requires_grad and not out.requires_grad


def test_empty_batch(vit: torch.nn.Module) -> None:
    x = torch.zeros(0, 3, 32, 32)
    legrad = LeGrad(vit)
    assert legrad.attribute(x, target=1).shape == (0, 3, 32, 32)
    assert legrad.attribute(x, target=1, output="map").shape == (0, 1, 32, 32)
    assert legrad.attribute(x, target=1, output="grid").shape == (0, 1, 4, 4)
    assert legrad.attribute_multi(x, targets=[1, 2]).shape == (0, 2, 32, 32)
    assert legrad.attribute_layers(x, target=1).shape == (0, 3, 4, 4)


def test_layer_selection_and_order(vit: torch.nn.Module, images) -> None:
    x = images(1)
    everything = LeGrad(vit).attribute_layers(x, target=2)
    subset = LeGrad(vit, [-1, 0]).attribute_layers(x, target=2)  # stored sorted: [0, 2]
    assert LeGrad(vit, [-1, 0]).layers == (0, 2)
    torch.testing.assert_close(subset, everything[:, [0, 2]], rtol=1e-5, atol=1e-12)


def test_sum_and_mean_aggregation_agree_after_normalisation(vit: torch.nn.Module, images) -> None:
    from captum_legrad.internals import minmax_normalize

    per_layer = LeGrad(vit).attribute_layers(images(2), target=1)
    torch.testing.assert_close(
        minmax_normalize(per_layer.sum(1)), minmax_normalize(per_layer.mean(1)), atol=1e-6, rtol=0
    )


def test_constant_map_is_zero_not_nan(images) -> None:
    model = make_model("vit")
    with torch.no_grad():
        model.head.weight.zero_()
    with pytest.warns(UserWarning, match="all zeros for 2 of 2"):  # deliberate: a dead head
        out = LeGrad(model).attribute(images(2), target=1)
    assert torch.equal(out, torch.zeros_like(out))


def test_tiny_scale_maps_are_not_distorted(images) -> None:
    # LayerScale models give maps of ~1e-9; no epsilon may flatten them.
    model = make_model("vit")
    with torch.no_grad():
        model.head.weight.mul_(1e-7)
    x = images(2)
    raw = LeGrad(model).attribute_layers(x, target=1)
    assert 0 < raw.abs().max() < 1e-7
    got = LeGrad(model).attribute(x, target=1, output="map")
    assert (got - oracle_legrad(model, x, torch.tensor([1, 1]))).abs().max() <= 1e-5
    assert got.flatten(1).amax(1).eq(1).all()


@pytest.mark.parametrize("mode", ["nearest", "bicubic", "area"])
def test_interpolate_modes(vit: torch.nn.Module, images, mode: str) -> None:
    grid = LeGrad(vit).attribute(images(1), target=1, output="grid", normalize=False)
    got = LeGrad(vit).attribute(images(1), target=1, output="map", interpolate_mode=mode)
    ref = torch.nn.functional.interpolate(
        grid, size=(32, 32), mode=mode, **({"align_corners": False} if mode == "bicubic" else {})
    )
    lo, hi = ref.amin(), ref.amax()
    torch.testing.assert_close(got, (ref - lo) / (hi - lo), atol=1e-6, rtol=0)


def test_training_mode_warns_and_works(images) -> None:
    model = make_model("vit").train()
    with pytest.warns(UserWarning, match="training mode"):
        out = LeGrad(model).attribute(images(1), target=1)
    assert torch.isfinite(out).all()
    assert model.training


def test_wrapper_module_is_discovered(vit: torch.nn.Module, images) -> None:
    x = images(2)
    wrapper = torch.nn.Sequential(torch.nn.Identity(), vit)
    assert torch.equal(LeGrad(wrapper).attribute(x, target=1), LeGrad(vit).attribute(x, target=1))
