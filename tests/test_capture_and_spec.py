"""Attention capture building blocks, and a hand-built ViTSpec for a custom ViT."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model
from torch import Tensor, nn

from captum_legrad import LeGrad, ViTSpec, discover
from captum_legrad.errors import CaptureError
from captum_legrad.internals import ProbabilityRecord, explicit_sdpa, record_attention


@pytest.mark.parametrize("case", ["plain", "bool_mask", "float_mask", "causal", "scale", "gqa"])
def test_explicit_sdpa_matches_fused(case: str) -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=gen) for _ in range(3))
    kwargs: dict = {}
    if case == "bool_mask":
        kwargs["attn_mask"] = torch.rand(5, 5, generator=gen) > 0.3
        kwargs["attn_mask"][:, 0] = True
    elif case == "float_mask":
        kwargs["attn_mask"] = torch.randn(2, 1, 5, 5, generator=gen)
    elif case == "causal":
        kwargs["is_causal"] = True
    elif case == "scale":
        kwargs["scale"] = 0.05
    elif case == "gqa":
        k, v = k[:, :2], v[:, :2]
        kwargs["enable_gqa"] = True
    out, probs = explicit_sdpa(q, k, v, **kwargs)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, **kwargs))
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 5))
    # probabilities written out by hand for the plain case
    if case == "plain":
        expected = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), dim=-1)
        torch.testing.assert_close(probs, expected)


def test_recorder_sees_fused_and_eager_attention() -> None:
    model = make_model("vit")
    x = torch.randn(1, 3, 32, 32)
    model.blocks[1].attn.fused_attn = False  # eager softmax path in one block
    try:
        with record_attention([b.attn for b in model.blocks], "explicit") as records:
            model(x)
    finally:
        model.blocks[1].attn.fused_attn = True
    assert [len(r) for r in records] == [1, 1, 1]
    assert all(isinstance(r[0], ProbabilityRecord) for r in records)
    assert all(r[0].leaf.shape == (1, 2, 17, 17) for r in records)
    assert torch._C._len_torch_function_stack() == 0


# ---------------------------------------------------------------------------- custom ViT


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.keep: list = []  # the oracle path stores probabilities here

    def forward(self, x: Tensor, explicit: bool = False) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if explicit:
            probs = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5, dim=-1)
            self.keep.append(probs)
            out = probs @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.explicit = False

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), explicit=self.explicit)
        return x + self.mlp(self.norm2(x))


class TinyCustomViT(nn.Module):
    """A ViT no adapter knows: two register tokens, no CLS, 6-pixel patches."""

    def __init__(self, dim: int = 24, depth: int = 3, heads: int = 3, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, kernel_size=6, stride=6)
        self.registers = nn.Parameter(torch.randn(1, 2, dim))
        self.layers = nn.ModuleList(_Block(dim, heads) for _ in range(depth))
        self.final = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.registers.expand(x.shape[0], -1, -1), tokens], dim=1)
        for layer in self.layers:
            tokens = layer(tokens)
        return self.classifier(self.final(tokens[:, 2:].mean(1)))


def _custom_spec(model: TinyCustomViT) -> ViTSpec:
    return ViTSpec(
        family="custom",
        root=model,
        blocks=tuple(model.layers),
        attentions=tuple(layer.attn for layer in model.layers),
        readout=lambda z: model.classifier(model.final(z.mean(1))),
        model_readout=lambda z: model.classifier(model.final(z[:, 2:].mean(1))),
        num_prefix_tokens=2,
        patch_size=(6, 6),
        grid=lambda h, w: (h // 6, w // 6),
    )


def _custom_oracle(model: TinyCustomViT, x: Tensor, target: Tensor) -> Tensor:
    """docs/method.md by hand on the model's explicit path: per-layer autograd.grad loop."""
    for layer in model.layers:
        layer.explicit, layer.attn.keep = True, []
    outs: list = []
    hooks = [layer.register_forward_hook(lambda m, a, o: outs.append(o)) for layer in model.layers]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
        for layer in model.layers:
            layer.explicit = False
    maps = []
    for layer, z in zip(model.layers, outs):
        s = model.classifier(model.final(z.mean(1)))[torch.arange(len(x)), target].sum()
        (g,) = torch.autograd.grad(s, layer.attn.keep[0], retain_graph=True)
        maps.append(g.clamp(min=0).mean(dim=(1, 2))[:, 2:])
    grid = torch.stack(maps).sum(0).view(len(x), 1, x.shape[2] // 6, x.shape[3] // 6)
    up = F.interpolate(grid, size=x.shape[-2:], mode="bilinear", align_corners=False)
    lo = up.flatten(1).amin(1).view(-1, 1, 1, 1)
    hi = up.flatten(1).amax(1).view(-1, 1, 1, 1)
    return (up - lo) / (hi - lo)


def test_custom_vit_needs_a_spec_and_works_with_one() -> None:
    torch.manual_seed(0)
    model = TinyCustomViT().eval()
    with pytest.raises(TypeError, match="spec="):
        LeGrad(model)
    x = torch.randn(2, 3, 24, 36)  # 4x6 grid, non-square
    target = torch.tensor([1, 3])
    got = LeGrad(model, spec=_custom_spec(model)).attribute(x, target=target, output="map")
    assert got.shape == (2, 1, 24, 36)
    assert (got - _custom_oracle(model, x, target)).abs().max() <= 1e-5


def test_custom_spec_with_wrong_prefix_count_is_reported() -> None:
    model = TinyCustomViT().eval()
    spec = _custom_spec(model)
    bad = ViTSpec(**{**spec.__dict__, "grid": lambda h, w: (h // 6, w // 6 - 1)})
    with pytest.raises(CaptureError, match="grid"):
        LeGrad(model, spec=bad).attribute(torch.randn(1, 3, 24, 36), target=0)


def test_attention_module_without_attention_is_reported() -> None:
    model = TinyCustomViT().eval()
    spec = _custom_spec(model)
    wrong = ViTSpec(**{**spec.__dict__, "attentions": tuple(layer.mlp for layer in model.layers)})
    with pytest.raises(CaptureError, match="Expected one attention computation"):
        LeGrad(model, spec=wrong).attribute(torch.randn(1, 3, 24, 24), target=0)
    assert torch._C._len_torch_function_stack() == 0


def test_spec_validation() -> None:
    model = TinyCustomViT()
    spec = _custom_spec(model)
    with pytest.raises(ValueError, match="one attention module per block"):
        ViTSpec(**{**spec.__dict__, "attentions": spec.attentions[:2]})
    with pytest.raises(ValueError, match="empty"):
        ViTSpec(**{**spec.__dict__, "blocks": (), "attentions": ()})
    with pytest.raises(AttributeError):
        spec.num_prefix_tokens = 3  # type: ignore[misc]  # frozen
    with pytest.raises(ValueError, match="pool_query"):
        ViTSpec(**{**spec.__dict__, "pool_query": 0})
    pooler = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="no mean-pooled variant"):
        ViTSpec(**{**spec.__dict__, "pool_attention": pooler})
    pooled = ViTSpec(**{**spec.__dict__, "pool_attention": pooler, "readout": None})
    assert pooled.read("mean") is pooled.read("model") is spec.model_readout
    with pytest.raises(ValueError, match="readout"):
        ViTSpec(**{**spec.__dict__, "readout": None})
    with pytest.raises(ValueError, match="patch_size"):
        ViTSpec(**{**spec.__dict__, "patch_size": (0, 6)})
    with pytest.raises(ValueError, match=r"nn\.Module"):
        ViTSpec(**{**spec.__dict__, "attentions": (None,) * 3})


def test_token_input_is_named_by_the_spec() -> None:
    """Blocks called with the tokens as a keyword are cut from the graph too."""
    from captum_legrad import TokenInput

    model = TinyCustomViT().eval()
    spec = _custom_spec(model)
    assert spec.token_input == TokenInput("x", 0)  # the first parameter of forward
    x = torch.randn(2, 3, 24, 36)
    target = torch.tensor([1, 3])
    expected = _custom_oracle(model, x, target)

    class KeywordCalls(nn.Module):
        """The same model, calling its blocks with ``tokens=`` as a keyword."""

        def __init__(self, inner: TinyCustomViT) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, images: Tensor) -> Tensor:
            inner = self.inner
            tokens = inner.embed(images).flatten(2).transpose(1, 2)
            tokens = torch.cat([inner.registers.expand(len(images), -1, -1), tokens], dim=1)
            for layer in inner.layers:
                tokens = layer(x=tokens)
            return inner.classifier(inner.final(tokens[:, 2:].mean(1)))

    wrapped = KeywordCalls(model)
    got = LeGrad(wrapped, spec=spec).attribute(x, target=target, output="map")
    assert (got - expected).abs().max() <= 1e-5
    wrong = ViTSpec(**{**spec.__dict__, "token_input": TokenInput("hidden_states", 3)})
    with pytest.raises(CaptureError, match="hidden_states"):
        LeGrad(wrapped, spec=wrong).attribute(x, target=target)


def test_patch_layout_selects_the_patch_keys() -> None:
    """A layout rule picks the patch keys wherever they are (here: registers last)."""
    from captum_legrad import PatchLayout

    values = torch.arange(2 * 9, dtype=torch.float32).view(2, 9)  # (B, N_k): 8 patches + 1
    layout = PatchLayout(torch.arange(0, 8), (2, 4))
    assert torch.equal(layout.gather(values), values[:, :8].view(2, 2, 4))
    per_sample = PatchLayout(
        torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [0, 1, 2, 3, 4, 5, 6, 7]]), (2, 4)
    )
    got = per_sample.gather(values)
    assert torch.equal(got[0], values[0, 1:].view(2, 4))
    assert torch.equal(got[1], values[1, :8].view(2, 4))
    with pytest.raises(ValueError, match="positions"):
        PatchLayout(torch.arange(7), (2, 4))
    model = TinyCustomViT().eval()
    spec = _custom_spec(model)
    x = torch.randn(1, 3, 24, 36)
    default = spec.patch_layout((x,), 2 + 24)
    assert torch.equal(default.keys, torch.arange(2, 26)) and default.grid == (4, 6)
    # A custom rule is used by the computation: a layout naming the wrong keys changes the map.
    shifted = ViTSpec(
        **{**spec.__dict__, "layout": lambda inputs, n: PatchLayout(torch.arange(0, 24), (4, 6))}
    )
    right = LeGrad(model, spec=spec).attribute(x, target=1, output="grid", normalize=False)
    other = LeGrad(model, spec=shifted).attribute(x, target=1, output="grid", normalize=False)
    per_key = LeGrad(model, spec=spec).attribute_layers(x, target=1).sum(1)
    assert torch.allclose(right[:, 0], per_key)
    assert not torch.allclose(right, other)


def test_discover_timm_fields() -> None:
    spec = discover(make_model("dinov2_reg"))
    assert (spec.family, spec.num_layers, spec.num_prefix_tokens, spec.patch_size) == (
        "timm",
        3,
        5,
        (8, 8),
    )
    assert spec.grid_size(32, 32) == (4, 4) and spec.pool_attention is None
    distilled = discover(make_model("deit_distilled"))
    assert distilled.num_prefix_tokens == 2
    siglip = discover(make_model("siglip_map"))
    assert siglip.num_prefix_tokens == 0 and siglip.pool_attention is not None
    dynamic = discover(make_model("vit_dynamic"))
    assert dynamic.grid_size(40, 56) == (5, 7)
