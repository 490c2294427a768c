"""captum_legrad.custom.vit_spec: a custom ViT described by its blocks and head only."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from test_capture_and_spec import TinyCustomViT, _custom_oracle
from test_grids import VIDEO, Spectrogram, VideoViT, oracle_video
from torch import nn

from captum_legrad import InputAxes, LeGrad, UnsupportedModelError
from captum_legrad.custom import find_attentions, vit_spec

ROOT = Path(__file__).resolve().parents[1]


def test_docs_worked_example_runs() -> None:
    text = (ROOT / "docs" / "models.md").read_text()
    section = text.split("## A custom ViT, found for you", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block is not None
    exec(compile(block.group(1), "docs/models.md vit_spec example", "exec"), {})


def test_vit_spec_finds_what_a_hand_written_spec_says() -> None:
    torch.manual_seed(0)
    model = TinyCustomViT().eval()
    x = torch.randn(2, 3, 24, 36)
    spec = vit_spec(model, model.layers, model.classifier, x, norm=model.final, pool="avg")
    assert spec.attentions == tuple(layer.attn for layer in model.layers)
    assert spec.num_prefix_tokens == 2 and spec.patch_size == (6, 6) and spec.batch_first
    target = torch.tensor([1, 3])
    got = LeGrad(model, spec=spec).attribute(x, target=target, output="map")
    assert (got - _custom_oracle(model, x, target)).abs().max() <= 1e-5
    # pooling="model" with pool="avg" is the model's own output at the last layer
    last = LeGrad(model, [-1], pooling="model", spec=spec)
    assert last.attribute(x, target=target).abs().sum() > 0


class _SeqFirst(nn.Module):
    """Sequence-first nn.MultiheadAttention blocks (OpenCLIP 2.23 style), a CLS token."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, kernel_size=4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(dim, 2, 32, 0.0) for _ in range(2))
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.embed(x).flatten(2).transpose(1, 2)
        z = torch.cat([self.cls.expand(len(x), -1, -1), z], dim=1).transpose(0, 1)
        for layer in self.layers:
            z = layer(z)
        return self.head(z[0])


def _mha_oracle(model: _SeqFirst, x: torch.Tensor, target: int) -> torch.Tensor:
    """Per-layer maps by hand: the attention recomputed from the MHA weights."""
    maps = []
    z = model.embed(x).flatten(2).transpose(1, 2)
    z = torch.cat([model.cls.expand(len(x), -1, -1), z], dim=1)
    for layer in model.layers:
        mha = layer.self_attn
        b, n, d = z.shape
        h = mha.num_heads
        q, k, v = nn.functional.linear(z, mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1)
        q, k, v = (t.view(b, n, h, d // h).transpose(1, 2) for t in (q, k, v))
        a = torch.softmax(q @ k.transpose(-2, -1) / (d // h) ** 0.5, -1).detach().requires_grad_()
        att = mha.out_proj((a @ v).transpose(1, 2).reshape(b, n, d))
        x1 = layer.norm1(z + att)
        z_out = layer.norm2(x1 + layer.linear2(layer.activation(layer.linear1(x1))))
        score = model.head(z_out.mean(1))[:, target].sum()
        (g,) = torch.autograd.grad(score, a)
        maps.append(g.clamp(min=0).mean(dim=(1, 2))[:, 1:])
        z = z_out.detach()
    return torch.stack(maps, 1)


def test_sequence_first_multihead_attention() -> None:
    torch.manual_seed(0)
    model = _SeqFirst().eval()
    x = torch.randn(2, 3, 16, 16)
    spec = vit_spec(model, model.layers, model.head, x)
    assert not spec.batch_first and spec.num_prefix_tokens == 1
    assert spec.attentions == tuple(layer.self_attn for layer in model.layers)
    ours = LeGrad(model, spec=spec).attribute_layers(x, target=2)
    ref = _mha_oracle(model, x, 2).view_as(ours)
    assert ref.abs().max() > 0
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_blocks_without_attention_are_named() -> None:
    model = TinyCustomViT().eval()
    x = torch.randn(1, 3, 24, 24)
    with pytest.raises(UnsupportedModelError, match=r"Block 0 .*Sequential.* no attention"):
        find_attentions([layer.mlp for layer in model.layers], lambda: model(x))
    with pytest.raises(UnsupportedModelError, match="3 times"):
        find_attentions([model], lambda: model(x))  # the whole model as one block


class _UnfoldViT(TinyCustomViT):
    """Patches by unfolding and a linear layer: no strided Conv2d to read the size from."""

    def __init__(self) -> None:
        super().__init__()
        self.unfold, self.linear = nn.Unfold(6, stride=6), nn.Linear(3 * 36, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.linear(self.unfold(x).transpose(1, 2))
        tokens = torch.cat([self.registers.expand(x.shape[0], -1, -1), tokens], dim=1)
        for layer in self.layers:
            tokens = layer(tokens)
        return self.classifier(self.final(tokens[:, 2:].mean(1)))


def test_patch_size_is_asked_for_when_it_cannot_be_found() -> None:
    model = _UnfoldViT().eval()
    x = torch.randn(1, 3, 24, 24)
    model.embed = nn.Identity()  # a fresh test model: drop the unused strided conv
    with pytest.raises(ValueError, match="pass patch_size"):
        vit_spec(model, model.layers, model.classifier, x)
    spec = vit_spec(model, model.layers, model.classifier, x, patch_size=6)
    assert spec.num_prefix_tokens == 2
    with pytest.raises(ValueError, match=r"18 tokens"):
        vit_spec(model, model.layers, model.classifier, x, patch_size=3)


# ------------------------------------------------------------------ grids of any rank


def test_docs_video_example_runs() -> None:
    text = (ROOT / "docs" / "models.md").read_text()
    section = text.split("### Video and spectrogram transformers of your own", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block is not None
    exec(compile(block.group(1), "docs/models.md video vit_spec example", "exec"), {})


def test_vit_spec_describes_a_video_grid_as_the_oracle_says() -> None:
    torch.manual_seed(0)
    model = VideoViT().eval()
    video = torch.randn(2, 4, 3, 8, 12, generator=torch.Generator().manual_seed(3))
    spec = vit_spec(
        model, model.blocks, model.head, video, norm=model.norm, input_axes=VIDEO, pool="avg"
    )
    assert spec.patch_size == (2, 4, 4) and spec.patch_stride is None
    assert spec.num_prefix_tokens == 1 and spec.input_grid(video) == (2, 2, 3)
    ref = oracle_video(model, video, 1)  # the toy's own readout: head(norm(mean of all))
    assert float(ref.flatten(2).std(-1).min()) > 0
    got = LeGrad(model, spec=spec).attribute_layers(video, target=1)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_vit_spec_finds_overlapping_spectrogram_patches() -> None:
    torch.manual_seed(1)
    model = Spectrogram().eval()
    spectrogram = torch.randn(2, 11, 9)  # time 11, mel 9 → (f, t) grid (3, 4)
    axes = InputAxes(grid=(2, 1), channels=None, name="spectrogram")
    spec = vit_spec(model, model.blocks, model.head, spectrogram, norm=model.norm, input_axes=axes)
    assert spec.patch_size == (4, 4) and spec.patch_stride == (2, 2)
    assert spec.num_prefix_tokens == 0 and spec.input_grid(spectrogram) == (3, 4)
    legrad = LeGrad(model, spec=spec)
    assert legrad.attribute(spectrogram, target=0).shape == spectrogram.shape
    with pytest.raises(ValueError, match="one positive size per grid axis"):
        vit_spec(model, model.blocks, model.head, spectrogram, input_axes=axes, patch_size=(4,))
