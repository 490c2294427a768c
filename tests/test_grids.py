"""Grids of any rank, overlapping patches and blocks with several attentions, on toy models
described by hand (``ViTSpec.input_axes``, ``patch_stride``, ``sites``), against an
oracle written here from docs/method.md: per layer, ``torch.autograd.grad`` of the layer's
score w.r.t. the probabilities the toy stores (no code shared with the package)."""

from __future__ import annotations

import math
from typing import Any, List, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_legrad import LeGrad, PatchLayout, ViTSpec
from captum_legrad.spec import AttentionSite, InputAxes

GEN = torch.Generator().manual_seed(5)


class Attention(nn.Module):
    """Multi-head self-attention over ``(B, N, D)``: fused, or explicit with the
    probabilities kept (the oracle's path)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.explicit = False
        self.kept: List[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.explicit:
            probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)
            self.kept.append(probs)
            out = probs @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VideoViT(nn.Module):
    """Tubelets (2 frames × 4 × 4 pixels) of ``(B, T, C, H, W)`` video, a CLS token, two
    blocks, mean-pooled head."""

    def __init__(self, dim: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Conv3d(3, dim, kernel_size=(2, 4, 4), stride=(2, 4, 4))
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.blocks = nn.ModuleList([Block(dim, 2), Block(dim, 2)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def tokens(self, video: Tensor) -> Tensor:
        x = self.embed(video.transpose(1, 2)).flatten(2).transpose(1, 2)  # (B, t·h·w, D)
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)

    def forward(self, video: Tensor) -> Tensor:
        x = self.tokens(video)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x.mean(dim=1)))


VIDEO = InputAxes(grid=(1, 3, 4), channels=2, name="video")


def video_spec(model: VideoViT) -> ViTSpec:
    return ViTSpec(
        family="toy video",
        root=model,
        blocks=tuple(model.blocks),
        attentions=tuple(b.attn for b in model.blocks),
        readout=lambda z: model.head(model.norm(z.mean(dim=1))),
        model_readout=lambda z: model.head(model.norm(z.mean(dim=1))),
        num_prefix_tokens=1,
        patch_size=(2, 4, 4),
        grid=lambda t, h, w: (t // 2, h // 4, w // 4),
        input_axes=VIDEO,
    )


def oracle_video(model: VideoViT, video: Tensor, target: int) -> Tensor:
    """``(B, L, t, h, w)`` per-layer maps from the definition."""
    for block in model.blocks:
        block.attn.explicit, block.attn.kept = True, []
    outs: List[Tensor] = []
    try:
        with torch.enable_grad():
            x = model.tokens(video)
            for block in model.blocks:
                x = block(x)
                outs.append(x)
            maps = []
            for block, z in zip(model.blocks, outs):
                score = model.head(model.norm(z.mean(dim=1)))[:, target].sum()
                (grad,) = torch.autograd.grad(score, block.attn.kept[0], retain_graph=True)
                e = grad.clamp(min=0).mean(dim=(1, 2))[:, 1:]  # drop CLS
                t, h, w = video.shape[1] // 2, video.shape[3] // 4, video.shape[4] // 4
                maps.append(e.reshape(-1, t, h, w))
    finally:
        for block in model.blocks:
            block.attn.explicit, block.attn.kept = False, []
    return torch.stack(maps, dim=1).detach()


def _minmax(x: Tensor) -> Tensor:
    flat = x.flatten(1)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - low) / (high - low)).view_as(x)


@pytest.mark.parametrize("route", ["lean", "explicit"])
def test_a_video_grid_matches_the_oracle(route: str) -> None:
    torch.manual_seed(0)
    model = VideoViT().eval()
    video = torch.randn(2, 4, 3, 8, 12, generator=GEN)  # T=4, H=8, W=12 → grid (2, 2, 3)
    legrad = LeGrad(model, spec=video_spec(model), route=route)
    ref = oracle_video(model, video, 1)
    assert ref.flatten(2).amax(-1).min() > 0  # every layer's map is non-zero
    got = legrad.attribute_layers(video, target=1)
    assert got.shape == (2, 2, 2, 2, 3)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    grid = legrad.attribute(video, target=1, output="grid", normalize=False)
    assert grid.shape == (2, 1, 2, 2, 3)
    torch.testing.assert_close(grid[:, 0], ref.sum(1), rtol=1e-5, atol=1e-7)
    normed = legrad.attribute(video, target=1, output="grid")
    torch.testing.assert_close(normed[:, 0], _minmax(ref.sum(1)), rtol=1e-4, atol=1e-5)
    heat = legrad.attribute(video, target=1, output="map")
    assert heat.shape == (2, 1, 4, 8, 12)  # (T, H, W), min-max over all frames together
    expected = F.interpolate(ref.sum(1, keepdim=True), size=(4, 8, 12), mode="trilinear")
    torch.testing.assert_close(heat, _minmax(expected[:, 0]).unsqueeze(1), rtol=1e-4, atol=1e-5)
    attr = legrad.attribute(video, target=1)
    assert attr.shape == video.shape  # (B, T, C, H, W): the map over the channels
    torch.testing.assert_close(attr[:, :, 2], heat[:, 0])
    multi = legrad.attribute_multi(video, targets=[1, 3], output="input")
    assert multi.shape == (2, 2, 4, 3, 8, 12)
    torch.testing.assert_close(multi[:, 0], attr)
    single = legrad.attribute(video[1:], target=1, output="grid", normalize=False)
    torch.testing.assert_close(single, grid[1:], rtol=1e-5, atol=1e-7)  # batch ≡ single


def test_a_video_input_in_the_wrong_layout_gets_one_line() -> None:
    model = VideoViT().eval()
    legrad = LeGrad(model, spec=video_spec(model))
    with pytest.raises(ValueError, match=r"video batches \(B, T, C, H, W\).*unsqueeze\(0\)"):
        legrad.attribute(torch.randn(4, 3, 8, 12), target=1)


# ------------------------------------------------------------------ overlapping patches


class Spectrogram(nn.Module):
    """``(B, time, mel)`` input; 4×4 patches every 2 cells over (frequency, time); tokens run
    over frequency first, as the Audio Spectrogram Transformer's do."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, dim, kernel_size=4, stride=2)
        self.blocks = nn.ModuleList([Block(dim, 2)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 3)

    def forward(self, spec: Tensor) -> Tensor:
        x = self.embed(spec.transpose(1, 2).unsqueeze(1))  # (B, D, F', T')
        x = x.flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x.mean(dim=1)))


def test_overlapping_patches_give_each_cell_the_mean_of_its_patches() -> None:
    torch.manual_seed(1)
    model = Spectrogram().eval()
    spectrogram = torch.randn(2, 11, 9, generator=GEN)  # time 11, mel 9 → grid (3, 4)
    axes = InputAxes(grid=(2, 1), channels=None, name="spectrogram")
    spec = ViTSpec(
        family="toy audio",
        root=model,
        blocks=tuple(model.blocks),
        attentions=(model.blocks[0].attn,),
        readout=lambda z: model.head(model.norm(z.mean(dim=1))),
        model_readout=lambda z: model.head(model.norm(z.mean(dim=1))),
        num_prefix_tokens=0,
        patch_size=(4, 4),
        patch_stride=(2, 2),
        grid=lambda f, t: ((f - 4) // 2 + 1, (t - 4) // 2 + 1),
        input_axes=axes,
    )
    legrad = LeGrad(model, spec=spec)
    grid = legrad.attribute(spectrogram, target=0, output="grid", normalize=False)[:, 0]
    assert grid.shape == (2, 3, 4) and grid.abs().max() > 0
    heat = legrad.attribute(spectrogram, target=0, output="map", normalize=False)[:, 0]
    assert heat.shape == (2, 9, 11)  # (frequency, time): grid order
    expected = torch.zeros(2, 9, 11)
    count = torch.zeros(9, 11)
    for i in range(3):
        for j in range(4):
            expected[:, 2 * i : 2 * i + 4, 2 * j : 2 * j + 4] += grid[:, i, j, None, None]
            count[2 * i : 2 * i + 4, 2 * j : 2 * j + 4] += 1
    expected = torch.where(count > 0, expected / count.clamp(min=1), torch.zeros(()))
    assert bool((count == 0).any())  # the last time cell is covered by no patch: 0
    torch.testing.assert_close(heat, expected, rtol=1e-5, atol=1e-8)
    attr = legrad.attribute(spectrogram, target=0)
    assert attr.shape == spectrogram.shape  # (B, time, mel)
    torch.testing.assert_close(attr, _minmax(expected).transpose(1, 2), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ several attentions


class DividedBlock(nn.Module):
    """TimeSformer-style: attention over the frames at each position, then over the
    positions of each frame; tokens ``(B, t·n, D)``, frame-major."""

    def __init__(self, dim: int, frames: int) -> None:
        super().__init__()
        self.frames = frames
        self.temporal, self.spatial = Attention(dim, 2), Attention(dim, 2)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        b, tn, d = x.shape
        t, n = self.frames, tn // self.frames
        per_position = x.view(b, t, n, d).transpose(1, 2).reshape(b * n, t, d)
        x = x + self.temporal(per_position).view(b, n, t, d).transpose(1, 2).reshape(b, tn, d)
        per_frame = x.reshape(b * t, n, d)
        x = x + self.spatial(per_frame).reshape(b, tn, d)
        return x + self.mlp(self.norm(x))


class DividedViT(nn.Module):
    def __init__(self, dim: int = 16, frames: int = 3) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, kernel_size=4, stride=4)
        self.blocks = nn.ModuleList([DividedBlock(dim, frames), DividedBlock(dim, frames)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 4)

    def forward(self, video: Tensor) -> Tensor:
        b = video.shape[0]
        x = self.embed(video.flatten(0, 1)).flatten(2).transpose(1, 2)  # (B·T, n, D)
        x = x.reshape(b, -1, x.shape[-1])
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x.mean(dim=1)))


def divided_spec(model: DividedViT, t: int, h: int, w: int) -> ViTSpec:
    n = h * w

    def temporal_layout(inputs: Tuple[Any, ...], n_keys: int) -> PatchLayout:
        # rows (b, position), keys frames: cell (frame, position) is row position, key frame
        frame = torch.arange(t).view(t, 1)
        position = torch.arange(n).view(1, n)
        return PatchLayout((position * t + frame).flatten(), (t, h, w), rows=n)

    def spatial_layout(inputs: Tuple[Any, ...], n_keys: int) -> PatchLayout:
        return PatchLayout(torch.arange(t * n), (t, h, w), rows=t)  # rows frames, keys positions

    def readout(z: Tensor) -> Tensor:
        return model.head(model.norm(z.mean(dim=1)))

    return ViTSpec(
        family="toy divided",
        root=model,
        blocks=tuple(model.blocks),
        attentions=tuple(model.blocks),
        readout=readout,
        model_readout=readout,
        num_prefix_tokens=0,
        patch_size=(1, 4, 4),
        grid=lambda frames, height, width: (frames, height // 4, width // 4),
        input_axes=VIDEO,
        sites={
            i: (
                AttentionSite(block.temporal, temporal_layout, 0.5),
                AttentionSite(block.spatial, spatial_layout, 0.5),
            )
            for i, block in enumerate(model.blocks)
        },
    )


def oracle_divided(model: DividedViT, video: Tensor, target: int) -> Tensor:
    """Per layer: each attention's ReLU gradient averaged over heads and the key's own
    queries, placed on its (frame, row, column) cell; the two averaged."""
    b, t, _, height, width = video.shape
    h, w = height // 4, width // 4
    attentions = [a for blk in model.blocks for a in (blk.temporal, blk.spatial)]
    for attention in attentions:
        attention.explicit, attention.kept = True, []
    try:
        with torch.enable_grad():
            x = model.embed(video.flatten(0, 1)).flatten(2).transpose(1, 2)
            x = x.reshape(b, -1, x.shape[-1])
            outs = []
            for block in model.blocks:
                x = block(x)
                outs.append(x)
            maps = []
            for block, z in zip(model.blocks, outs):
                score = model.head(model.norm(z.mean(dim=1)))[:, target].sum()
                g_t, g_s = torch.autograd.grad(
                    score, [block.temporal.kept[0], block.spatial.kept[0]], retain_graph=True
                )
                e_t = g_t.clamp(min=0).mean(dim=(1, 2)).view(b, h * w, t).transpose(1, 2)
                e_s = g_s.clamp(min=0).mean(dim=(1, 2)).view(b, t, h * w)
                maps.append((0.5 * e_t + 0.5 * e_s).view(b, t, h, w))
    finally:
        for attention in attentions:
            attention.explicit, attention.kept = False, []
    return torch.stack(maps, dim=1).detach()


@pytest.mark.parametrize("route", ["lean", "explicit"])
def test_a_block_with_two_attentions_matches_the_oracle(route: str) -> None:
    torch.manual_seed(2)
    model = DividedViT().eval()
    video = torch.randn(2, 3, 3, 8, 12, generator=GEN)  # grid (3, 2, 3)
    legrad = LeGrad(model, spec=divided_spec(model, 3, 2, 3), route=route)
    ref = oracle_divided(model, video, 2)
    assert ref.flatten(2).amax(-1).min() > 0
    got = legrad.attribute_layers(video, target=2)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    multi = legrad.attribute_multi(video, targets=[2, 0], output="grid", normalize=False)
    torch.testing.assert_close(multi[:, 0], ref.sum(1), rtol=1e-5, atol=1e-7)


def test_a_site_must_be_an_attention_site() -> None:
    model = DividedViT().eval()
    spec = divided_spec(model, 3, 2, 3)
    with pytest.raises(ValueError, match="AttentionSite"):
        ViTSpec(**{**spec.__dict__, "sites": {0: (model.blocks[0].temporal,)}})
    with pytest.raises(ValueError, match="patch_size"):
        ViTSpec(**{**spec.__dict__, "patch_size": (4, 4), "sites": {}})
