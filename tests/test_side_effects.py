"""The user's model (and the process) is exactly as before, also when a call raises
(docs/design.md)."""

from __future__ import annotations

from typing import Any, Callable, Dict

import pytest
import torch
import torch.nn.functional as F
from conftest import TIMM_MODELS, make_model
from torch import nn

from captum_legrad import LeGrad
from captum_legrad.errors import TargetError

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


def snapshot(model: nn.Module) -> Dict[str, Any]:
    """Everything LeGrad could conceivably change, model and process."""
    modules = dict(model.named_modules())
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "param_ids": {n: id(p) for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: p.grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in modules.items()},
        "fused": {n: m.fused_attn for n, m in modules.items() if hasattr(m, "fused_attn")},
        "instance_attrs": {n: sorted(vars(m)) for n, m in modules.items()},
        "forwards": {n: (m.__dict__.get("forward"), type(m).forward) for n, m in modules.items()},
        "hooks": {
            n: {d: list(getattr(m, d, {}).keys()) for d in _HOOK_DICTS} for n, m in modules.items()
        },
        "process": (
            F.scaled_dot_product_attention,
            F.softmax,
            torch.Tensor.softmax,
            torch.softmax,
            nn.Module.__call__,
            torch._C._len_torch_function_stack(),
            torch.is_grad_enabled(),
            len(torch.nn.modules.module._global_forward_hooks),
            len(torch.nn.modules.module._global_forward_pre_hooks),
        ),
    }


def assert_unchanged(before: Dict[str, Any], after: Dict[str, Any]) -> None:
    for name, value in before["params"].items():
        assert torch.equal(value, after["params"][name]), f"parameter {name} changed"
    for name, value in before["buffers"].items():
        assert torch.equal(value, after["buffers"][name]), f"buffer {name} changed"
    for key in (
        "param_ids",
        "requires_grad",
        "training",
        "fused",
        "instance_attrs",
        "forwards",
        "hooks",
        "process",
    ):
        assert before[key] == after[key], f"{key} changed"
    assert all(g is None for g in after["grads"].values()), "a .grad was left on a parameter"


@pytest.mark.parametrize("key", sorted(TIMM_MODELS))
def test_no_side_effects(key: str) -> None:
    model = make_model(key)
    size = (32, 48) if key == "vit_dynamic" else (32, 32)
    x = torch.randn(2, 3, *size)
    before = snapshot(model)
    legrad = LeGrad(model)
    legrad.attribute(x, target=1)
    legrad.attribute_multi(x, targets=[0, 2])
    legrad.attribute_layers(x, target=[1, 2])
    assert_unchanged(before, snapshot(model))


def test_fused_flag_is_really_on_during_the_call(vit: nn.Module, images) -> None:
    # LeGrad obtains A^l without switching fused attention off.
    seen = []
    handle = vit.blocks[0].attn.register_forward_pre_hook(lambda m, a: seen.append(m.fused_attn))
    try:
        LeGrad(vit).attribute(images(1), target=1)
    finally:
        handle.remove()
    assert seen == [vit.blocks[0].attn.fused_attn] and seen[0] is True


def _raise(*_: object, **__: object) -> None:
    raise RuntimeError("injected failure")


@pytest.mark.parametrize("where", ["block", "attention", "attention_pre", "head", "readout"])
def test_no_side_effects_when_the_call_raises(where: str, monkeypatch, images) -> None:
    model = make_model("vit")
    before = snapshot(model)
    legrad = LeGrad(model)
    handle = None
    if where == "block":
        handle = model.blocks[1].register_forward_hook(_raise)
    elif where == "attention":  # raised while the attention recorder is active
        handle = model.blocks[1].attn.proj.register_forward_hook(_raise)
    elif where == "attention_pre":
        handle = model.blocks[2].attn.qkv.register_forward_pre_hook(_raise)
    elif where == "head":
        handle = model.head.register_forward_hook(_raise)
    else:  # after the forward, inside the backward stage
        from captum_legrad.internals import OutputRecord

        monkeypatch.setattr(OutputRecord, "reduce", _raise)
    try:
        with pytest.raises(RuntimeError, match="injected failure"):
            legrad.attribute(images(2), target=1)
    finally:
        if handle is not None:
            handle.remove()
    assert_unchanged(before, snapshot(model))
    # and the model still works, LeGrad too
    monkeypatch.undo()
    assert LeGrad(model).attribute(images(1), target=1).shape == (1, 3, 32, 32)


def test_no_side_effects_after_bad_target(vit: nn.Module, images) -> None:
    before = snapshot(vit)
    with pytest.raises(TargetError):
        LeGrad(vit).attribute(images(2), target=7)
    assert_unchanged(before, snapshot(vit))


def test_no_side_effects_under_no_grad_and_training(images) -> None:
    model = make_model("vit").train()
    before = snapshot(model)
    with torch.no_grad(), pytest.warns(UserWarning):
        LeGrad(model).attribute(images(1), target=1)
    after = snapshot(model)
    assert_unchanged(before, after)


def _forward_output(model: nn.Module, x: torch.Tensor, wrap: Callable[[], Any]) -> torch.Tensor:
    captured = {}
    handle = model.register_forward_hook(lambda m, a, out: captured.setdefault("out", out))
    try:
        wrap()
    finally:
        handle.remove()
    return captured["out"].detach()


@pytest.mark.parametrize("key", sorted(TIMM_MODELS))
def test_forward_equivalence(key: str) -> None:
    """The model's output while LeGrad captures attention equals the fused output."""
    model = make_model(key)
    size = (32, 48) if key == "vit_dynamic" else (32, 32)
    x = torch.randn(3, 3, *size)
    with torch.no_grad():
        fused = model(x)
    during = _forward_output(model, x, lambda: LeGrad(model).attribute(x, target=0))
    torch.testing.assert_close(during, fused, atol=1e-5, rtol=1e-5)
