"""The lean route (``∂s/∂A = (∂s/∂O)·Vᵀ``, the default) equals the explicit route.

Every family the suite covers, for ``attribute``, ``attribute_multi`` and
``attribute_layers``; then the attention variants one by one (masks, ``is_causal``,
grouped-query attention, heads flattened into the batch, eager ``softmax``,
``nn.MultiheadAttention`` with and without weights, sequence-first, half precision), and
that the lean route never builds an ``(N × N)`` tensor.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from conftest import TIMM_MODELS, explainable, make_model
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from captum_legrad import LeGrad, discover
from captum_legrad.internals import (
    LinearInputGrad,
    OutputRecord,
    ProbabilityRecord,
    capture_blocks,
    linear_input_grad_hooks,
    prune_direct,
    record_attention,
    reduce_lean,
    run_forward,
)

#: Per-layer maps are raw gradients (1e-7 to 1e-2 in scale): relative to their maximum.
LAYER_RTOL = 1e-5
#: Final maps are min-max normalised to [0, 1]: absolute.
FINAL_ATOL = 1e-5

GEN = torch.Generator().manual_seed(11)


def _assert_routes_equal(
    make: Callable[[str], LeGrad], x: Tensor, target: Any, targets: Any
) -> None:
    lean, explicit = make("lean"), make("explicit")
    assert lean.route == "lean" and explicit.route == "explicit"
    ref = explicit.attribute_layers(x, target=target)
    got = lean.attribute_layers(x, target=target)
    scale = ref.abs().max()
    assert scale > 0, "all-zero maps would make the comparison vacuous"
    assert (got - ref).abs().max() <= LAYER_RTOL * scale, float((got - ref).abs().max() / scale)
    a = lean.attribute(x, target=target, output="map")
    b = explicit.attribute(x, target=target, output="map")
    assert (a - b).abs().max() <= FINAL_ATOL
    m = lean.attribute_multi(x, targets=targets)
    n = explicit.attribute_multi(x, targets=targets)
    assert m.shape[1] == len(targets) and (m - n).abs().max() <= FINAL_ATOL


# ----------------------------------------------------------------------------- families


@pytest.mark.parametrize(
    "key, pooling", [(key, "mean") for key in sorted(TIMM_MODELS)] + [("vit", "model")]
)
def test_timm_routes_equal(key: str, pooling: str) -> None:
    model = make_model(key)
    x = torch.randn(2, 3, 32, 32, generator=GEN)
    _assert_routes_equal(
        lambda route: LeGrad(model, pooling=pooling, route=route),
        x,
        torch.tensor([1, 4]),
        [0, 2, 3],
    )


def test_open_clip_routes_equal(monkeypatch: pytest.MonkeyPatch) -> None:
    from test_open_clip import clip_model, coca_model, sequence_first, siglip_tower, text

    from captum_legrad import ImageTextSimilarity

    x = torch.randn(2, 3, 32, 32, generator=GEN)
    prompts = text(4)
    towers: Dict[str, Tuple[nn.Module, Tensor]] = {
        "clip": (clip_model(), prompts),
        "clip_sequence_first": (sequence_first(clip_model()), prompts),
        "coca": (coca_model(), prompts),
        "siglip_timm": (siglip_tower(monkeypatch, "linear"), text(4, 24)),
    }
    for model, texts in towers.values():
        sim = ImageTextSimilarity(model, texts)
        _assert_routes_equal(
            lambda route, sim=sim: LeGrad(sim, route=route), x, torch.tensor([0, 3]), [0, 1, 2]
        )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_hf_routes_equal(attn: str) -> None:
    pytest.importorskip("transformers")
    from test_hf import cached

    x = torch.randn(2, 3, 32, 32, generator=GEN)
    for key in ("vit_cls", "clip", "dinov2_reg_cls", "siglip_cls", "siglip_vision"):
        model = explainable(cached(key, attn), x)  # clip, siglip_vision: their dims
        _assert_routes_equal(
            lambda route, model=model: LeGrad(model, route=route),
            x,
            torch.tensor([1, 3]),
            [0, 2, 4],
        )


def test_torchvision_routes_equal() -> None:
    from test_torchvision import tiny_vit

    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32, generator=GEN)
    for pooling in ("mean", "model"):
        _assert_routes_equal(
            lambda route, pooling=pooling: LeGrad(model, pooling=pooling, route=route),
            x,
            torch.tensor([2, 0]),
            [0, 1, 4],
        )


def test_bad_route() -> None:
    with pytest.raises(ValueError, match="route must be one of"):
        LeGrad(make_model("vit"), route="fast")


@pytest.mark.parametrize(
    "key, attn, kinds",
    [
        ("timm", "", {"lean"}),
        ("torchvision", "", {"lean"}),
        ("hf", "sdpa", {"lean"}),
        ("hf", "eager", {"lean"}),
    ],
)
def test_which_records_each_family_makes(key: str, attn: str, kinds: set) -> None:
    """The table in docs/design.md: which families get the lean record."""
    if key == "timm":
        model: nn.Module = make_model("vit")
    elif key == "torchvision":
        from test_torchvision import tiny_vit

        model = tiny_vit()
    else:
        pytest.importorskip("transformers")
        from test_hf import cached

        model = cached("vit_cls", attn)
    spec = discover(model)
    x = torch.randn(1, 3, 32, 32, generator=GEN)
    result = run_forward(spec, model, (x,), (), (0, 1, 2), "mean", "lean")
    got = {"lean" if isinstance(p.record, OutputRecord) else "probabilities" for p in result.parts}
    assert got == kinds


# ------------------------------------------------------------------------ attention kinds


class Toy(nn.Module):
    """One attention call of a given kind on ``(B, N, D)`` tokens, then a projection."""

    def __init__(self, kind: str, dim: int = 16, heads: int = 4, kv_heads: int = 4) -> None:
        super().__init__()
        self.kind, self.heads, self.kv_heads = kind, heads, kv_heads
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim)
        self.proj = nn.Linear(dim, dim)
        self.mask: Optional[Tensor] = None

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, self.kv_heads, -1).permute(2, 0, 3, 1, 4)
        kind = self.kind
        if kind == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v)
        elif kind == "sdpa_bool_mask":
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)
        elif kind == "sdpa_float_mask":
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, scale=0.3)
        elif kind == "sdpa_causal":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif kind == "sdpa_gqa":
            o = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        elif kind == "eager":
            probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.head_dim), dim=-1)
            o = torch.matmul(F.dropout(probs.to(q.dtype), p=0.1, training=False), v)
        elif kind == "eager_flat":  # heads flattened into the batch (transformers < 4.52 CLIP)
            qf, kf, vf = (t.reshape(b * self.heads, n, -1) for t in (q, k, v))
            probs = F.softmax(torch.bmm(qf, kf.transpose(1, 2)) * 0.5, dim=-1)
            o = torch.bmm(probs, vf).view(b, self.heads, n, -1)
        elif kind == "eager_other_use":  # probabilities used beyond A·V: stays explicit
            probs = (q @ k.transpose(-2, -1)).softmax(dim=-1)
            o = probs @ v + probs.mean(-1, keepdim=True)
        else:
            raise ValueError(kind)
        return self.proj(o.transpose(1, 2).reshape(b, n, d))


def _route_maps(module: nn.Module, x: Tensor, route: str, weight: Tensor) -> Tuple[Tensor, Any]:
    """``E`` (B, N_k) of the toy: block input cut, score ``Σ weight · output``."""
    inp = x.detach().requires_grad_(route == "explicit")
    with torch.enable_grad(), record_attention([module], route) as records:
        out = module(inp)
        score = (out * weight).sum()
        (record,) = records[0]
        prune_direct(records[0], [out])
        leaves = [record.leaf] if record.direct is None else [record.leaf, record.direct]
        grads = torch.autograd.grad(score, leaves)
    extra = grads[1] if len(grads) > 1 else None
    return record.reduce(grads[0], rows=x.shape[0], batched=False, direct=extra)[0], record


@pytest.mark.parametrize(
    "kind",
    [
        "sdpa",
        "sdpa_bool_mask",
        "sdpa_float_mask",
        "sdpa_causal",
        "sdpa_gqa",
        "eager",
        "eager_flat",
        "eager_other_use",
    ],
)
def test_attention_kinds(kind: str) -> None:
    torch.manual_seed(0)
    toy = Toy(kind, kv_heads=2 if kind == "sdpa_gqa" else 4).eval()
    n = 7
    if kind == "sdpa_bool_mask":
        toy.mask = torch.rand(2, 1, n, n, generator=GEN) > 0.3
        toy.mask[..., 0] = True  # no fully masked row
    elif kind == "sdpa_float_mask":
        toy.mask = torch.randn(2, 4, n, n, generator=GEN)
    x = torch.randn(2, n, 16, generator=GEN)
    weight = torch.randn(2, n, 16, generator=GEN)
    ref, ref_record = _route_maps(toy, x, "explicit", weight)
    got, record = _route_maps(toy, x, "lean", weight)
    assert isinstance(ref_record, ProbabilityRecord)
    assert isinstance(record, OutputRecord)
    # eager probabilities used beyond A·V stay alive (their direct gradient is added)
    live = record.direct is not None
    assert live is (kind == "eager_other_use")
    assert got.dtype == torch.float32 and got.shape == (2, n)
    assert ref.abs().max() > 0
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("mask", [None, "bool", "float", "padding", "causal"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention(need_weights: bool, mask: Optional[str], batch_first: bool) -> None:
    torch.manual_seed(0)
    n, b = 6, 2
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    kwargs: Dict[str, Any] = {"need_weights": need_weights}
    if mask == "bool":
        m = torch.rand(n, n, generator=GEN) > 0.6
        m.fill_diagonal_(False)
        kwargs["attn_mask"] = m
    elif mask == "float":
        kwargs["attn_mask"] = torch.randn(b * 4, n, n, generator=GEN)
    elif mask == "padding":
        pad = torch.zeros(b, n, dtype=torch.bool)
        pad[1, -2:] = True
        kwargs["key_padding_mask"] = pad
    elif mask == "causal":
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(n)
        kwargs["is_causal"] = True

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = mha

        def forward(self, x: Tensor) -> Tensor:
            out, weights = self.attn(x, x, x, **kwargs)
            return out if weights is None else out + 0.01 * weights.sum()

    block = Block()
    x = torch.randn((b, n, 16) if batch_first else (n, b, 16), generator=GEN)
    weight = torch.randn(x.shape, generator=GEN)
    with torch.no_grad():
        plain = block(x)
    maps = {}
    for route in ("explicit", "lean"):
        inp = x.detach().requires_grad_(route == "explicit")
        with torch.enable_grad(), record_attention([mha], route) as records:
            out = block(inp)
            torch.testing.assert_close(out.detach(), plain, atol=1e-5, rtol=1e-5)
            (record,) = records[0]
            if route == "lean":
                assert isinstance(record, OutputRecord) is not need_weights
            (grad,) = torch.autograd.grad((out * weight).sum(), record.leaf)
        maps[route] = record.reduce(grad, rows=b, batched=False)[0]
    ref = maps["explicit"]
    assert ref.abs().max() > 0
    torch.testing.assert_close(maps["lean"], ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_routes_agree(dtype: torch.dtype) -> None:
    """Both routes compute ``dO·Vᵀ`` in the model's dtype; sums over queries in float32."""
    model = make_model("vit").to(dtype)
    x = torch.randn(2, 3, 32, 32, generator=GEN).to(dtype)
    lean = LeGrad(model).attribute_layers(x, target=[1, 3])
    explicit = LeGrad(model, route="explicit").attribute_layers(x, target=[1, 3])
    assert lean.dtype == explicit.dtype == torch.float32
    scale = explicit.abs().max()
    assert scale > 0 and (lean - explicit).abs().max() <= 0.02 * scale


def test_reduce_lean_accumulates_in_float32_and_chunks() -> None:
    g = torch.randn(2, 3, 50, 8, generator=GEN)
    v = torch.randn(2, 3, 40, 8, generator=GEN)
    expected = (g.double() @ v.double().transpose(-2, -1)).clamp(min=0).mean(dim=(-3, -2))
    for chunk in (1, 37, 1 << 24):
        got = reduce_lean(g, v, chunk_elements=chunk)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    half = reduce_lean(g.bfloat16(), v.bfloat16(), chunk_elements=100)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half.double(), expected, rtol=0.05, atol=0.05)


def test_training_mode_dropout_runs_on_the_lean_route() -> None:
    model = make_model("vit", attn_drop_rate=0.5).train()
    x = torch.randn(2, 3, 32, 32, generator=GEN)
    with pytest.warns(UserWarning, match="training mode"):
        maps = LeGrad(model).attribute_layers(x, target=[0, 1])
    assert torch.isfinite(maps).all() and maps.abs().max() > 0


# ---------------------------------------------------------------- no (N x N) tensor built


class _Shapes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.shapes: List[Tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("route", ["lean", "explicit"])
def test_lean_route_never_builds_the_attention_matrix(
    route: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 48x48 input, patch 8: N = 37 tokens; reduce in chunks of fewer than N query rows.
    monkeypatch.setattr(OutputRecord, "chunk_elements", 2 * 37 * 16)
    model = make_model("vit_dynamic")
    x = torch.randn(1, 3, 48, 48, generator=GEN)
    legrad = LeGrad(model, route=route)
    with _Shapes() as mode:
        legrad.attribute_multi(x, targets=[0, 1], output="grid")
    square = [s for s in mode.shapes if len(s) >= 2 and s[-2:] == (37, 37)]
    if route == "explicit":
        assert square  # the check can fail: the explicit route does build them
    else:
        assert not square, square[:3]


# ------------------------------------------------------------ rank-one MLP backward (mean)


def _family_models() -> Dict[str, Callable[[], nn.Module]]:
    from test_open_clip import clip_model, sequence_first
    from test_torchvision import tiny_vit

    models: Dict[str, Callable[[], nn.Module]] = {
        "timm_vit": lambda: make_model("vit"),
        "timm_dinov2_reg": lambda: make_model("dinov2_reg"),
        "timm_eva": lambda: make_model("eva"),
        "open_clip": lambda: clip_model(),
        "open_clip_sequence_first": lambda: sequence_first(clip_model()),
        "torchvision": tiny_vit,
    }
    try:
        from test_hf import cached

        for key in ("vit_cls", "clip_vision", "dinov2_reg_cls", "siglip_cls"):
            models[f"hf_{key}"] = lambda key=key: cached(key, "sdpa")
    except pytest.skip.Exception:  # transformers not installed
        pass
    return models


@pytest.mark.parametrize("family", sorted(_family_models()))
def test_mean_readout_gradient_is_the_same_for_every_token(family: str) -> None:
    """What the one-row MLP backward relies on: the adapters' mean readouts."""
    model = _family_models()[family]()
    spec = discover(model)
    x = torch.randn(2, 3, 32, 32, generator=GEN)
    with capture_blocks(spec, [1], differentiable=False) as captured:
        with torch.no_grad():
            model(x) if not hasattr(model, "get_image_features") else spec.image_forward(x)
    tokens = captured.tokens[0].detach().requires_grad_()
    with torch.enable_grad():
        scores = spec.readout(tokens)
        (grad,) = torch.autograd.grad(scores.reshape(2, -1)[:, 0].sum(), tokens)
    assert grad.abs().max() > 0
    torch.testing.assert_close(grad, grad[:, :1].expand_as(grad), rtol=1e-6, atol=0)


@pytest.mark.parametrize("family", sorted(_family_models()))
def test_one_row_mlp_backward_is_used_and_exact(
    family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: List[Tuple[int, ...]] = []
    original = LinearInputGrad.forward

    def counting(
        ctx: Any, inputs: Tensor, holder: List[Tensor], weight: Tensor, token_dim: Optional[int]
    ) -> Tensor:
        if token_dim is not None:
            calls.append(tuple(holder[0].shape))  # the one-row backward's linear
        return original(ctx, inputs, holder, weight, token_dim)

    monkeypatch.setattr(LinearInputGrad, "forward", staticmethod(counting))
    x = torch.randn(2, 3, 32, 32, generator=GEN)
    model = explainable(_family_models()[family](), x)  # feature models: their dims
    spec = discover(model)
    legrad = LeGrad(model)
    got = legrad.attribute_layers(x, target=[0, 1])
    assert len(calls) == spec.num_layers  # every block takes the one-row backward
    ref = LeGrad(model, route="explicit").attribute_layers(x, target=[0, 1])
    assert (got - ref).abs().max() <= LAYER_RTOL * ref.abs().max()
    calls.clear()
    LeGrad(model, pooling="model").attribute_layers(x, target=[0, 1])
    assert not calls  # the model's own pooling is not a token mean


def test_linear_shared_between_blocks_and_called_twice() -> None:
    """Every ``nn.Linear`` of a selected block computes only its input gradient on the lean
    route: a linear shared by two blocks is hooked once, one called twice in a block gets
    its gradient from both calls, and the maps equal the explicit route's."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, depth=3, embed_dim=32, num_heads=2
    ).eval()
    model.blocks[2].mlp.fc1 = model.blocks[1].mlp.fc1  # shared between blocks 1 and 2
    proj = model.blocks[0].attn.proj

    class Twice(nn.Module):  # block 0's projection applied twice
        def __init__(self) -> None:
            super().__init__()
            self.proj = proj

        def forward(self, x: Tensor) -> Tensor:
            return self.proj(self.proj(x))

    model.blocks[0].attn.proj = Twice()
    x = torch.randn(2, 3, 32, 32, generator=GEN)
    lean = LeGrad(model).attribute_layers(x, target=[1, 2])
    explicit = LeGrad(model, route="explicit").attribute_layers(x, target=[1, 2])
    assert explicit.flatten(2).abs().amax(-1).min() > 0  # every layer's map is non-zero
    assert (lean - explicit).abs().max() <= LAYER_RTOL * explicit.abs().max()
    assert torch.is_grad_enabled()  # the grad mode is what it was before the calls
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_linear_hooks_restore_grad_mode_when_the_forward_raises() -> None:
    """The pre-hook switches gradients off for the linear; its hook (always called) puts the
    mode back also when the linear's forward raises."""
    pre_hook, hook = linear_input_grad_hooks()
    linear = nn.Linear(4, 3)
    linear.register_forward_pre_hook(pre_hook)
    linear.register_forward_hook(hook, always_call=True)
    with torch.enable_grad():
        with pytest.raises(RuntimeError):
            linear(torch.randn(2, 5))  # wrong width
        assert torch.is_grad_enabled()
        x = torch.randn(2, 4, requires_grad=True)
        (grad,) = torch.autograd.grad(linear(x).sum(), x)
    torch.testing.assert_close(grad, torch.ones(2, 3) @ linear.weight.detach())
