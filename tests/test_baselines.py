"""Baselines against independent computations on a timm ViT in its eager attention path."""

from __future__ import annotations

import copy
from typing import Any, List, Tuple

import pytest
import torch
from captum.attr import Saliency
from conftest import make_model
from torch import Tensor, nn

from captum_legrad.baselines import (
    AttentionRollout,
    ChannelSummed,
    GenericAttention,
    InputXGradientMap,
    IntegratedGradientsMap,
    RawAttention,
    SaliencyMap,
    ViTGradCAM,
)


def eager_attentions(model: nn.Module, x: Tensor, grad: bool) -> Tuple[Tensor, List[Tensor]]:
    """Output and per-block attention probabilities of a copy run with fused_attn off.

    timm's eager path multiplies ``attn_drop(softmax(q kᵀ))`` with ``v``: the input of
    ``attn_drop`` is the probability tensor on the autograd path.
    """
    twin: Any = copy.deepcopy(model)
    found: List[Tensor] = []
    for block in twin.blocks:
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(lambda m, a, o: found.append(a[0]))
    with torch.set_grad_enabled(grad):
        out = twin(x)
    return out, found


def cls_rows(matrix: Tensor, prefix: int) -> Tensor:
    return matrix[:, 0, prefix:]


@pytest.fixture
def x() -> Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def test_raw_attention_is_last_cls_row(x: Tensor) -> None:
    model = make_model("vit")
    _, attentions = eager_attentions(model, x, grad=False)
    expected = cls_rows(attentions[-1].mean(1), 1).reshape(2, 1, 4, 4)
    got = RawAttention(model).attribute(x, output="grid")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert RawAttention(model).attribute(x).shape == x.shape


def test_raw_attention_without_prefix_averages_queries(x: Tensor) -> None:
    model = make_model("vit", class_token=False, global_pool="avg")
    _, attentions = eager_attentions(model, x, grad=False)
    expected = attentions[-1].mean(1).mean(1).reshape(2, 1, 4, 4)
    torch.testing.assert_close(RawAttention(model).attribute(x, output="grid"), expected)


def test_rollout_matches_abnar_zuidema(x: Tensor) -> None:
    model = make_model("vit")
    _, attentions = eager_attentions(model, x, grad=False)
    rollout = torch.eye(17).expand(2, 17, 17)
    for a in attentions:
        rollout = (0.5 * a.mean(1) + 0.5 * torch.eye(17)) @ rollout
    expected = cls_rows(rollout, 1).reshape(2, 1, 4, 4)
    got = AttentionRollout(model).attribute(x, output="grid")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # rows of the rolled-out matrix sum to one; the CLS row minus its prefix entry is < 1
    assert float(got.sum(dim=(1, 2, 3)).max()) < 1.0


def test_gae_matches_chefer_rule(x: Tensor) -> None:
    model = make_model("vit")
    target = torch.tensor([1, 4])
    out, attentions = eager_attentions(model, x.clone().requires_grad_(), grad=True)
    grads = torch.autograd.grad(out[torch.arange(2), target].sum(), attentions)
    relevance = torch.eye(17).expand(2, 17, 17)
    for a, g in zip(attentions, grads):
        relevance = relevance + (g * a).clamp(min=0).mean(1) @ relevance
    expected = cls_rows(relevance, 1).reshape(2, 1, 4, 4)
    got = GenericAttention(model).attribute(x, target=target, output="grid")
    torch.testing.assert_close(got, expected.float(), rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())


def test_gradcam_on_last_block_input(x: Tensor) -> None:
    model = make_model("deit_distilled")  # two prefix tokens
    target = 2
    twin: Any = copy.deepcopy(model)
    kept: List[Tensor] = []
    twin.blocks[-1].register_forward_pre_hook(lambda m, a: kept.append(a[0]))
    out = twin(x.clone().requires_grad_())
    (grad,) = torch.autograd.grad(out[:, target].sum(), kept[0])
    weights = grad[:, 2:].mean(1, keepdim=True)
    expected = (weights * kept[0][:, 2:]).sum(-1).clamp(min=0).reshape(2, 1, 4, 4)
    got = ViTGradCAM(model).attribute(x, target=target, output="grid")
    torch.testing.assert_close(got, expected.detach(), rtol=1e-4, atol=1e-6)
    assert float(got.abs().sum()) > 0  # the last block's input reaches the CLS token


def test_channel_summed_captum_methods(x: Tensor) -> None:
    model = make_model("vit")
    leaf = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(model(leaf)[:, 3].sum(), leaf)
    saliency = SaliencyMap(model).attribute(x, target=3, output="map")
    torch.testing.assert_close(saliency, grad.abs().sum(1, keepdim=True))
    ixg = InputXGradientMap(model).attribute(x, target=3)
    torch.testing.assert_close(ixg, (x * grad).sum(1, keepdim=True).expand_as(x))
    wrapped = ChannelSummed(model, Saliency(model), name="mine")
    assert wrapped.get_name() == "mine"
    # IG satisfies completeness: the channel-summed maps add up to f(x) - f(0)
    ig = IntegratedGradientsMap(model, n_steps=64).attribute(x, target=3, output="map")
    with torch.no_grad():
        delta = model(x)[:, 3] - model(torch.zeros_like(x))[:, 3]
    torch.testing.assert_close(ig.sum(dim=(1, 2, 3)), delta, rtol=0.05, atol=0.02)


def test_outputs_and_no_side_effects(x: Tensor) -> None:
    model = make_model("vit")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [b.attn.fused_attn for b in model.blocks]
    for cls in (RawAttention, AttentionRollout, GenericAttention, ViTGradCAM):
        method = cls(model)
        assert method.attribute(x, target=0).shape == (2, 3, 32, 32)
        assert method.attribute(x, target=0, output="map").shape == (2, 1, 32, 32)
        assert method.attribute(x, target=0, output="grid").shape == (2, 1, 4, 4)
        with pytest.raises(ValueError, match="output"):
            method.attribute(x, target=0, output="pixels")
    assert [b.attn.fused_attn for b in model.blocks] == flags
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_integer_images_are_rejected() -> None:
    with pytest.raises(ValueError, match="floating point"):
        RawAttention(make_model("vit")).attribute(torch.zeros(1, 3, 32, 32, dtype=torch.long))


def test_baselines_at_another_input_size() -> None:
    """At 64x48 on a 32x32 model: equal to the by-hand oracles on a dynamic_img_size twin
    (timm's own resampling), and nothing about the model changes."""
    import timm
    from conftest import TINY

    model = make_model("vit")
    twin = timm.create_model("vit_tiny_patch16_224", **{**TINY, "dynamic_img_size": True})
    twin.load_state_dict(model.state_dict())
    twin.eval()
    big = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(5))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, attentions = eager_attentions(twin, big, grad=False)
    expected = cls_rows(attentions[-1].mean(1), 1).reshape(2, 1, 8, 6)
    torch.testing.assert_close(RawAttention(model).attribute(big, output="grid"), expected)
    target = torch.tensor([1, 4])
    out, attentions = eager_attentions(twin, big.clone().requires_grad_(), grad=True)
    grads = torch.autograd.grad(out[torch.arange(2), target].sum(), attentions)
    relevance = torch.eye(49).expand(2, 49, 49)
    for a, g in zip(attentions, grads):
        relevance = relevance + (g * a).clamp(min=0).mean(1) @ relevance
    expected = cls_rows(relevance, 1).reshape(2, 1, 8, 6)
    got = GenericAttention(model).attribute(big, target=target, output="grid")
    torch.testing.assert_close(got, expected.float(), rtol=1e-4, atol=1e-6)
    assert ViTGradCAM(model).attribute(big, target=1).shape == big.shape
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="multiple"):
        RawAttention(model).attribute(torch.randn(1, 3, 60, 48))
