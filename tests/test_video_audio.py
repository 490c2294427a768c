"""HF video classifiers (VideoMAE, ViViT, TimeSformer, V-JEPA 2) and the Audio Spectrogram
Transformer (issue #22) at tiny random configurations, against the independent oracle of
``tests/oracle_video.py`` (per-layer ``autograd.grad`` on HF's own eager attentions)."""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_legrad import LeGrad, discover
from captum_legrad.errors import UnsupportedModelError

transformers = pytest.importorskip("transformers")

from _versions import require_hf  # noqa: E402
from conftest import assert_not_vacuous  # noqa: E402
from oracle_video import layer_maps  # noqa: E402

Build = Callable[[], Any]

#: key -> (class, config, input shape). 2 layers, hidden 32-48, 3-4 frames, small frames.
BUILDERS: Dict[str, Tuple[str, Callable[[], Any], Tuple[int, ...]]] = {
    "videomae": (
        "VideoMAEForVideoClassification",
        lambda: transformers.VideoMAEConfig(
            image_size=16, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=32,
            num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=4,
        ),
        (2, 4, 3, 16, 16),
    ),
    "videomae_cls": (  # use_mean_pooling=False: its readout is the first (patch) token
        "VideoMAEForVideoClassification",
        lambda: transformers.VideoMAEConfig(
            image_size=16, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=32,
            num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=4,
            use_mean_pooling=False,
        ),
        (2, 4, 3, 16, 16),
    ),
    "vivit": (
        "VivitForVideoClassification",
        lambda: transformers.VivitConfig(
            image_size=16, tubelet_size=[2, 8, 8], num_frames=4, hidden_size=32,
            num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=4,
        ),
        (2, 4, 3, 16, 16),
    ),
    "timesformer": (
        "TimesformerForVideoClassification",
        lambda: transformers.TimesformerConfig(
            image_size=16, patch_size=8, num_frames=3, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=64, num_labels=4,
        ),
        (2, 3, 3, 16, 16),
    ),
    "timesformer_joint": (  # one attention over all tokens, position-major
        "TimesformerForVideoClassification",
        lambda: transformers.TimesformerConfig(
            image_size=16, patch_size=8, num_frames=3, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=64, num_labels=4,
            attention_type="joint_space_time",
        ),
        (2, 3, 3, 16, 16),
    ),
    "vjepa2": (
        "VJEPA2ForVideoClassification",
        lambda: transformers.VJEPA2Config(
            crop_size=16, patch_size=8, frames_per_clip=4, tubelet_size=2, hidden_size=48,
            num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2.0, num_pooler_layers=1,
            pred_hidden_size=32, pred_num_hidden_layers=1, pred_num_attention_heads=2,
            num_labels=4,
        ),
        (2, 4, 3, 16, 16),
    ),
    "ast": (  # 4x4 patches every 2 mel bins and every 3 frames: they overlap
        "ASTForAudioClassification",
        lambda: transformers.ASTConfig(
            patch_size=4, frequency_stride=2, time_stride=3, max_length=14, num_mel_bins=10,
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            num_labels=4,
        ),
        (2, 14, 10),
    ),
}  # fmt: skip
KEYS = sorted(BUILDERS)
#: Families whose two poolings differ (VideoMAE's own pooling is the mean; V-JEPA 2's
#: attentive pooler is the readout of both).
TWO_POOLINGS = {"videomae_cls", "vivit", "timesformer", "timesformer_joint", "ast"}
SDPA = {"videomae", "vivit", "vjepa2", "ast"}  # TimeSformer has eager attention only


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """HF's all-zero tensors (CLS / distillation tokens, position tables, biases) at HF's
    init scale 0.02, so that no score is constant."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    return model


def make(key: str, attn: str = "eager", seed: int = 0) -> nn.Module:
    """A fresh model; ``"sdpa"`` and ``"eager"`` carry the same weights."""
    class_name, make_config, _ = BUILDERS[key]
    model_class = require_hf(class_name)
    models = []
    for implementation in ("eager", attn):
        config = make_config()
        config._attn_implementation = implementation
        torch.manual_seed(seed)
        models.append(model_class(config).eval())
    eager, model = models
    _randomize(eager, seed)
    model.load_state_dict(eager.state_dict())
    assert model.config._attn_implementation == attn
    return model


@functools.cache
def cached(key: str, attn: str = "eager") -> nn.Module:
    return make(key, attn)


def example(key: str, seed: int = 1) -> Tensor:
    return torch.randn(*BUILDERS[key][2], generator=torch.Generator().manual_seed(seed))


def _minmax(x: Tensor) -> Tensor:
    flat = x.flatten(1)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - low) / (high - low)).view_as(x)


def _close(got: Tensor, ref: Tensor) -> None:
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


CASES = [(key, "mean") for key in KEYS] + [(key, "model") for key in sorted(TWO_POOLINGS)]


@pytest.mark.parametrize("route", ["lean", "explicit"])
@pytest.mark.parametrize(("key", "pooling"), CASES)
def test_layer_maps_match_the_oracle(key: str, pooling: str, route: str) -> None:
    model, x = cached(key), example(key)
    ref = layer_maps(model, x, 1, pooling)
    assert_not_vacuous(ref)
    assert float(ref.flatten(2).std(-1).min()) > 0  # no layer's map is constant
    got = LeGrad(model, pooling=pooling, route=route).attribute_layers(x, target=1)
    assert got.shape == ref.shape
    _close(got, ref)


@pytest.mark.parametrize("key", KEYS)
def test_grid_sums_the_layers_and_normalises_over_all_frames(key: str) -> None:
    model, x = cached(key), example(key)
    ref = layer_maps(model, x, 2).sum(1)  # (B, *grid)
    legrad = LeGrad(model)
    raw = legrad.attribute(x, target=2, output="grid", normalize=False)
    assert raw.shape == (x.shape[0], 1, *ref.shape[1:])  # (B, 1, T', H', W') / (B, 1, F, T)
    _close(raw[:, 0], ref)
    normed = legrad.attribute(x, target=2, output="grid")
    torch.testing.assert_close(normed[:, 0], _minmax(ref), rtol=1e-4, atol=1e-5)
    single = legrad.attribute(x[1:], target=2, output="grid", normalize=False)
    _close(single, raw[1:])  # batch ≡ single


@pytest.mark.parametrize("key", ["videomae", "timesformer"])
def test_a_video_map_is_upsampled_in_the_video_layout(key: str) -> None:
    model, x = cached(key), example(key)
    ref = layer_maps(model, x, 0).sum(1, keepdim=True)  # (B, 1, t, h, w)
    legrad = LeGrad(model)
    attr = legrad.attribute(x, target=0)
    assert attr.shape == x.shape  # (B, T, C, H, W)
    size = (x.shape[1], x.shape[3], x.shape[4])
    expected = _minmax(F.interpolate(ref, size=size, mode="trilinear")[:, 0])  # (B, T, H, W)
    for channel in range(x.shape[2]):
        torch.testing.assert_close(attr[:, :, channel], expected, rtol=1e-4, atol=1e-5)


def test_a_spectrogram_map_is_the_overlap_mean_in_the_input_layout() -> None:
    model, x = cached("ast"), example("ast")
    config = model.config
    grid = layer_maps(model, x, 3).sum(1)  # (B, F, T)
    p, fs, ts = config.patch_size, config.frequency_stride, config.time_stride
    mel, frames = x.shape[2], x.shape[1]
    total = torch.zeros(x.shape[0], mel, frames)
    count = torch.zeros(mel, frames)
    for i in range(grid.shape[1]):
        for j in range(grid.shape[2]):
            total[:, i * fs : i * fs + p, j * ts : j * ts + p] += grid[:, i, j, None, None]
            count[i * fs : i * fs + p, j * ts : j * ts + p] += 1
    assert bool((count > 1).any())  # the patches overlap
    expected = torch.where(count > 0, total / count.clamp(min=1), torch.zeros(()))
    attr = LeGrad(model).attribute(x, target=3)
    assert attr.shape == x.shape  # (B, time, mel)
    torch.testing.assert_close(attr, _minmax(expected).transpose(1, 2), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("key", sorted(SDPA))
def test_sdpa_gives_the_eager_maps(key: str) -> None:
    x = example(key)
    eager = LeGrad(cached(key)).attribute_layers(x, target=1)
    sdpa = LeGrad(cached(key, "sdpa")).attribute_layers(x, target=1)
    _close(sdpa, eager)


@pytest.mark.parametrize("key", ["videomae", "timesformer", "vjepa2", "ast"])
def test_the_model_is_unchanged(key: str) -> None:
    model = make(key)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    output = model(example(key)).logits
    modes = {name: m.training for name, m in model.named_modules()}
    LeGrad(model, route="explicit").attribute(example(key), target=1)
    LeGrad(model).attribute(example(key), target=[0, 1])
    after = model.state_dict()
    assert before.keys() == after.keys()
    for name, value in before.items():
        assert torch.equal(value, after[name]), name  # bitwise
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())
    assert {name: m.training for name, m in model.named_modules()} == modes
    hooks = [m for m in model.modules() if m._forward_hooks or m._forward_pre_hooks]
    assert not hooks
    torch.testing.assert_close(model(example(key)).logits, output, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("key", "shape", "what"),
    [
        ("videomae", (1, 2, 3, 16, 16), "4 frames of 16x16"),
        ("timesformer", (1, 3, 3, 24, 16), "3 frames of 16x16"),
        ("vjepa2", (1, 4, 3, 24, 24), "16x16"),
        ("ast", (1, 20, 10), "14 frames x 10 mel bins"),
    ],
)
def test_another_input_size_gets_one_line(key: str, shape: Tuple[int, ...], what: str) -> None:
    with pytest.raises(ValueError, match=what) as info:
        LeGrad(cached(key)).attribute(torch.randn(*shape), target=0)
    assert "\n" not in str(info.value)


def test_a_video_without_the_batch_dimension_gets_one_line() -> None:
    with pytest.raises(ValueError, match=r"video batches \(B, T, C, H, W\).*unsqueeze\(0\)"):
        LeGrad(cached("videomae")).attribute(torch.randn(4, 3, 16, 16), target=0)


@pytest.mark.parametrize(
    ("class_name", "key"),
    [
        ("VideoMAEModel", "videomae"),
        ("VivitModel", "vivit"),
        ("TimesformerModel", "timesformer"),
        ("ASTModel", "ast"),
    ],
)
def test_base_models_are_feature_models(class_name: str, key: str) -> None:
    model = require_hf(class_name)(BUILDERS[key][1]()).eval()
    spec = discover(model)
    assert spec.scores_are_features
    assert len(spec.input_axes.grid) == (2 if key == "ast" else 3)
    with pytest.raises(UnsupportedModelError, match="FeatureDirection"):
        LeGrad(model)


def test_discover_describes_the_grid_of_each_family() -> None:
    ranks: Dict[str, Optional[int]] = {}
    for key in KEYS:
        spec = discover(cached(key))
        assert not spec.scores_are_features
        ranks[key] = len(spec.input_axes.grid)
    assert ranks == {key: (2 if key == "ast" else 3) for key in KEYS}
    ast = discover(cached("ast"))
    assert ast.num_prefix_tokens == 2 and ast.patch_stride == (2, 3)
    timesformer = discover(cached("timesformer"))
    assert sorted(timesformer.sites) == [0, 1]
    assert not discover(cached("timesformer_joint")).sites


def test_space_only_timesformer_is_refused_with_the_reason() -> None:
    config = BUILDERS["timesformer"][1]()
    config.attention_type = "space_only"
    model = require_hf("TimesformerForVideoClassification")(config).eval()
    with pytest.raises(UnsupportedModelError, match=r"space_only.*one output per frame"):
        LeGrad(model)
