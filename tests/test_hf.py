"""The Hugging Face transformers adapter: ViT, CLIP, DINOv2 (registers) and SigLIP.

Tiny random-init models (never ``from_pretrained``), in both the ``sdpa`` and the
``eager`` attention implementation, against the independent oracle in
``tests/oracle_hf.py`` (HF's own ``output_attentions`` on an eager copy).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Dict, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

tf = pytest.importorskip("transformers")

from _versions import (  # noqa: E402
    expect_size_refused,
    hf_attn,
    hf_interpolates,
    reason,
    require_hf,
)
from conftest import assert_not_vacuous, explainable, make_model  # noqa: E402
from oracle_hf import (  # noqa: E402
    finalize,
    hf_readout,
    oracle_layer_maps,
    oracle_legrad,
    siglip_head_by_hand,
    vision_tower,
)
from test_side_effects import assert_unchanged, snapshot  # noqa: E402

from captum_legrad import ImageTextSimilarity, LeGrad, ViTSpec, discover  # noqa: E402
from captum_legrad.adapters import hf as hf_adapter  # noqa: E402

FINAL_TOL = 1e-5
LAYER_RTOL = 1e-4

_VISION: Dict[str, Any] = dict(
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=32,
    patch_size=8,
)
_DINO: Dict[str, Any] = dict(
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=2,
    mlp_ratio=2,
    image_size=32,
    patch_size=8,
)
_TEXT: Dict[str, Any] = dict(
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=64,
    vocab_size=64,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)

#: name -> (model class name, config factory, extra constructor arguments); random init.
BUILDERS: Dict[str, Tuple[str, Callable[[], Any], Dict[str, Any]]] = {
    "vit_cls": ("ViTForImageClassification", lambda: tf.ViTConfig(**_VISION, num_labels=5), {}),
    "vit_model": ("ViTModel", lambda: tf.ViTConfig(**_VISION), {}),
    "vit_model_nopool": (
        "ViTModel",
        lambda: tf.ViTConfig(**_VISION),
        {"add_pooling_layer": False},
    ),
    "clip": (
        "CLIPModel",
        lambda: tf.CLIPConfig(vision_config=_VISION, text_config=_TEXT, projection_dim=16),
        {},
    ),
    "clip_vision": ("CLIPVisionModel", lambda: tf.CLIPVisionConfig(**_VISION), {}),
    "clip_vision_proj": (
        "CLIPVisionModelWithProjection",
        lambda: tf.CLIPVisionConfig(**_VISION, projection_dim=16),
        {},
    ),
    "clip_cls": (
        "CLIPForImageClassification",
        lambda: tf.CLIPConfig(vision_config=_VISION, text_config=_TEXT, num_labels=5),
        {},
    ),
    "dinov2": ("Dinov2Model", lambda: tf.Dinov2Config(**_DINO), {}),
    "dinov2_cls": (
        "Dinov2ForImageClassification",
        lambda: tf.Dinov2Config(**_DINO, num_labels=5),
        {},
    ),
    "dinov2_reg": (
        "Dinov2WithRegistersModel",
        lambda: tf.Dinov2WithRegistersConfig(**_DINO, num_register_tokens=2),
        {},
    ),
    "dinov2_reg_cls": (
        "Dinov2WithRegistersForImageClassification",
        lambda: tf.Dinov2WithRegistersConfig(**_DINO, num_register_tokens=2, num_labels=5),
        {},
    ),
    "siglip": (
        "SiglipModel",
        lambda: tf.SiglipConfig(vision_config=_VISION, text_config=_TEXT),
        {},
    ),
    "siglip_vision": ("SiglipVisionModel", lambda: tf.SiglipVisionConfig(**_VISION), {}),
    "siglip_nohead": (
        "SiglipVisionModel",
        lambda: tf.SiglipVisionConfig(**_VISION, vision_use_head=False),
        {},
    ),
    "siglip_cls": (
        "SiglipForImageClassification",
        lambda: tf.SiglipConfig(vision_config=_VISION, text_config=_TEXT, num_labels=5),
        {},
    ),
}
KEYS = sorted(BUILDERS)
MULTIMODAL = {"clip", "siglip"}
#: P (prefix tokens) per model.
PREFIX = {k: 0 if k.startswith("siglip") else 3 if k.startswith("dinov2_reg") else 1 for k in KEYS}


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random values for all-zero tensors HF initialises (register tokens, biases, ...).

    At HF's ``initializer_range`` (0.02), the scale of the weights: larger biases (0.1
    before) make the value vectors nearly one shared bias, and a whole layer's map came out
    all zeros for some samples (ViTModel, DINOv2 with registers at 32x48).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    return model


def make_hf(key: str, attn: Optional[str] = None, seed: int = 0) -> nn.Module:
    """``attn=None``: ``sdpa`` where the release has it for the class, else ``eager``."""
    class_name, make_config, extra = BUILDERS[key]
    model_class = require_hf(class_name)
    attn = hf_attn(model_class, attn)
    config = make_config()
    config._attn_implementation = attn  # the user's choice, which LeGrad leaves alone
    torch.manual_seed(seed)
    model = model_class(config, **extra)
    if not getattr(config, "vision_use_head", True) and hasattr(vision_tower(model), "head"):
        pytest.skip(reason("transformers", "SigLIP vision_use_head=False", "transformers 4.41"))
    assert model.config._attn_implementation == attn
    return _randomize(model, seed).eval()


@functools.cache
def cached(key: str, attn: Optional[str] = None) -> nn.Module:
    """Shared read-only instance (tests that check side effects build their own)."""
    return make_hf(key, attn)


def forward_func(key: str, model: nn.Module) -> Callable[..., Any]:
    """What LeGrad calls: the model, or for CLIP / SigLIP its image tower's features."""
    if key in MULTIMODAL:
        return model.get_image_features  # type: ignore[return-value]
    return model


def legrad(key: str, model: nn.Module, layers: Any = None, pooling: str = "mean") -> LeGrad:
    """``LeGrad(model)`` for a classifier; a feature model (every class here but the
    ``*ForImageClassification`` ones) through ``FeatureDirection`` with identity rows, its
    embedding's dimensions as the targets (``LeGrad(model)`` refuses it)."""
    return LeGrad(explainable(model, images(1)), layers, pooling=pooling)


def images(batch: int = 3, height: int = 32, width: int = 32, seed: int = 7) -> Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def _targets(batch: int = 3) -> Tensor:
    """Per-sample targets, valid for 5 classes and for the 16- / 32-d embeddings."""
    return torch.tensor([1, 4, 2, 0, 3][:batch])


def _model_output(key: str, model: nn.Module, x: Tensor, **kwargs: Any) -> Tensor:
    """The model's real output: logits, image embedding or pooler output."""
    if key in MULTIMODAL:
        out = model.get_image_features(x, **kwargs)  # type: ignore[operator]
    else:
        out = model(x, **kwargs)
    if isinstance(out, Tensor):  # transformers 4.x get_image_features
        return out
    for name in ("logits", "image_embeds", "pooler_output"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    if key == "vit_model_nopool":  # the normalised CLS token
        return out.last_hidden_state[:, 0]
    return out.last_hidden_state.mean(dim=1)  # SigLIP without a head: the mean token


def _assert_layers_close(ours: Tensor, ref: Tensor) -> None:
    assert ours.shape == ref.shape
    scale = ref.abs().max()
    assert scale > 0, "oracle map is all zeros; the comparison would be vacuous"
    assert_not_vacuous(ref)
    assert (ours - ref).abs().max() <= LAYER_RTOL * scale


# ---------------------------------------------------------------------------- discovery


@pytest.mark.parametrize("key", KEYS)
def test_discover_fields(key: str) -> None:
    model = cached(key)
    spec = discover(model)
    assert isinstance(spec, ViTSpec)
    assert spec.family == "hf"
    assert spec.num_layers == 3
    assert spec.num_prefix_tokens == PREFIX[key]
    assert spec.patch_size == (8, 8)
    assert spec.grid_size(32, 48) == (4, 6)
    attention_names = {type(a).__name__ for a in spec.attentions}
    assert len(attention_names) == 1 and attention_names.pop().endswith("Attention")
    has_pool = key in ("siglip", "siglip_vision")
    assert (spec.pool_attention is not None) == has_pool
    if has_pool:
        assert type(spec.pool_attention).__name__ == "SiglipMultiheadAttentionPoolingHead"
    # the root runs the blocks
    assert all(any(b is m for m in spec.root.modules()) for b in spec.blocks)


def test_non_hf_models_are_left_to_other_adapters() -> None:
    assert hf_adapter.match(make_model("vit")) is None
    assert hf_adapter.match(nn.Linear(3, 3)) is None
    # a wrapper around an HF ViT is found through discover's breadth-first search
    wrapped = nn.Sequential(nn.Identity(), cached("vit_cls"))
    assert discover(wrapped).root is cached("vit_cls").vit


@pytest.mark.parametrize("key", KEYS)
def test_model_readout_is_the_model_output(key: str) -> None:
    model = make_hf(key)
    x = images()
    spec = discover(model)
    tower = model.vision_model if key in MULTIMODAL else model
    with torch.no_grad():
        hidden = tower(x, output_hidden_states=True).hidden_states
        real = _model_output(key, model, x)
        ours = spec.model_readout(hidden[-1])
    torch.testing.assert_close(ours, real, atol=1e-5, rtol=1e-5)
    # the oracle's hand-written readouts agree with the adapter's, both poolings
    with torch.no_grad():
        for pooling, readout in (("model", spec.model_readout), ("mean", spec.readout)):
            torch.testing.assert_close(hf_readout(model, hidden[1], pooling)[0], readout(hidden[1]))


def test_siglip_head_by_hand() -> None:
    head = vision_tower(cached("siglip_vision")).head
    feats = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pooled, attn = siglip_head_by_hand(head, feats)
        torch.testing.assert_close(pooled, head(feats))
    assert attn.shape == (2, 2, 1, 16)


# ---------------------------------------------------------------------------- oracle


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("key", KEYS)
def test_matches_oracle(key: str, attn: str) -> None:
    model = cached(key, attn)
    x = images()
    target = _targets()
    for pooling in ("mean", "model"):
        # all layers from the oracle; layers=[-2, -1] is their last two
        ref = oracle_layer_maps(model, x, target, None, pooling)
        _assert_layers_close(legrad(key, model, None, pooling).attribute_layers(x, target), ref)
        for layers, selected in ((None, ref), ([-2, -1], ref[:, -2:])):
            ours = legrad(key, model, layers, pooling).attribute(x, target=target, output="map")
            assert ours.shape == (3, 1, 32, 32)
            assert (ours - finalize(selected, (32, 32))).abs().max() <= FINAL_TOL, (pooling, layers)
            assert bool((ours.flatten(1).amax(1) == 1.0).all())


def test_oracle_layer_subset_is_the_full_oracle_sliced() -> None:
    model = cached("vit_cls")
    x, target = images(), _targets()
    full = oracle_layer_maps(model, x, target, None, "mean")
    torch.testing.assert_close(oracle_layer_maps(model, x, target, [-2, -1], "mean"), full[:, -2:])


@pytest.mark.parametrize("key", KEYS)
def test_batch_equivalence(key: str) -> None:
    model = cached(key)
    x = images()
    target = _targets()
    explainer = legrad(key, model)
    batch = explainer.attribute(x, target=target, output="map")
    for i in range(x.shape[0]):
        alone = explainer.attribute(x[i : i + 1], target=int(target[i]), output="map")
        torch.testing.assert_close(alone[0], batch[i], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("key", KEYS)
def test_no_side_effects(key: str, attn: str) -> None:
    model = make_hf(key, attn)
    x = images(2)
    before = snapshot(model)
    configs = {
        n: m.config._attn_implementation for n, m in model.named_modules() if hasattr(m, "config")
    }
    explainer = legrad(key, model)
    explainer.attribute(x, target=1)
    explainer.attribute_multi(x, targets=[0, 2])
    legrad(key, model, pooling="model").attribute_layers(x, target=[1, 2])
    assert_unchanged(before, snapshot(model))
    after = {
        n: m.config._attn_implementation for n, m in model.named_modules() if hasattr(m, "config")
    }
    assert after == configs


def test_no_side_effects_when_the_call_raises() -> None:
    model = make_hf("vit_cls")
    before = snapshot(model)

    def fail(*_: object) -> None:
        raise RuntimeError("injected failure")

    # raised inside layer 1's attention, while the attention recorder is active
    spec = discover(model)
    linear = next(m for m in spec.attentions[1].modules() if isinstance(m, nn.Linear))
    handle = linear.register_forward_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="injected failure"):
            LeGrad(model).attribute(images(2), target=1)
    finally:
        handle.remove()
    assert_unchanged(before, snapshot(model))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("key", KEYS)
def test_forward_equivalence(key: str, attn: str) -> None:
    """The model's output while LeGrad captures attention equals its plain output."""
    model = cached(key, attn)
    x = images()
    with torch.no_grad():
        plain = _model_output(key, model, x)
    spec = discover(model)
    explainer = legrad(key, model)  # a feature model: its FeatureDirection wrapper
    outputs: list = []
    handle = spec.root.register_forward_hook(lambda m, a, out: outputs.append(out))
    try:
        with torch.no_grad():
            plain_root = spec.root(x)
        outputs.clear()
        explainer.attribute(x, target=0)
    finally:
        handle.remove()
    assert len(outputs) == 1
    during = outputs[0]
    torch.testing.assert_close(
        during.last_hidden_state.detach(), plain_root.last_hidden_state, atol=1e-5, rtol=1e-5
    )
    # what LeGrad ran (the classifier, or the wrapper: the embedding through identity rows)
    top: list = []
    handle = explainer.forward_func.register_forward_hook(lambda m, a, out: top.append(out))
    try:
        explainer.attribute(x, target=0)
    finally:
        handle.remove()
    value = top[0]
    if not isinstance(value, Tensor):
        value = next(
            getattr(value, n)
            for n in ("logits", "image_embeds", "pooler_output")
            if getattr(value, n, None) is not None
        )
    torch.testing.assert_close(value.detach(), plain, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- dynamic size

#: Models whose forward takes ``interpolate_pos_encoding`` (DINOv2 always interpolates).
DYNAMIC = ("vit_cls", "dinov2_cls", "dinov2_reg", "clip_vision", "siglip_vision")


def _interpolate_args(model: nn.Module) -> Tuple[Any, ...]:
    """``additional_forward_args`` that set ``interpolate_pos_encoding=True`` positionally.

    Its position differs between models and transformers versions, so it is looked up.
    """
    names = list(inspect.signature(model.forward).parameters)
    if "interpolate_pos_encoding" not in names:
        return ()
    position = names.index("interpolate_pos_encoding")
    return (None,) * (position - 1) + (True,)


@pytest.mark.parametrize("size", [(32, 48), (48, 24)])
@pytest.mark.parametrize("key", DYNAMIC)
def test_dynamic_non_square(key: str, size: Tuple[int, int]) -> None:
    model = cached(key)
    x = images(2, *size)
    target = torch.tensor([0, 3])
    if not hf_interpolates(model):
        since = {"clip_vision": "transformers 4.46", "siglip_vision": "transformers 4.41"}
        expect_size_refused(
            lambda: legrad(key, model).attribute(x, target=target), model, since.get(key, "?")
        )
    args = _interpolate_args(model)
    kwargs = {"interpolate_pos_encoding": True} if args else {}
    for pooling in ("mean", "model"):
        explainer = legrad(key, model, pooling=pooling)
        ours = explainer.attribute(
            x, target=target, additional_forward_args=args or None, output="map"
        )
        assert ours.shape == (2, 1, *size)
        expected = oracle_legrad(model, x, target, None, pooling, forward_kwargs=kwargs)
        assert_not_vacuous(expected)
        assert (ours - expected).abs().max() <= FINAL_TOL
    grid = explainer.attribute(
        x, target=target, additional_forward_args=args or None, output="grid", normalize=False
    )
    assert grid.shape == (2, 1, size[0] // 8, size[1] // 8)


# ---------------------------------------------------------------------------- image-text


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("key", ["clip", "siglip", "clip_vision_proj"])
def test_image_text_similarity(key: str, attn: str) -> None:
    model = cached(key, attn)
    dim = 16 if key.startswith("clip") else 32
    text = torch.randn(4, dim, generator=torch.Generator().manual_seed(3))
    sim = ImageTextSimilarity(model, text)
    x = images()
    with torch.no_grad():
        expected = F.normalize(_model_output(key, model, x), dim=-1) @ F.normalize(text, dim=-1).T
        torch.testing.assert_close(sim(x), expected, atol=1e-5, rtol=1e-5)
    target = torch.tensor([3, 0, 2])
    for pooling in ("mean", "model"):
        ours = LeGrad(sim, pooling=pooling).attribute(x, target=target, output="map")
        ref = oracle_legrad(model, x, target, None, pooling, text=text)
        assert_not_vacuous(ref)
        assert (ours - ref).abs().max() <= FINAL_TOL
    multi = LeGrad(sim).attribute_multi(x, targets=[0, 1, 2, 3])
    for k in range(4):
        single = LeGrad(sim).attribute(x, target=k, output="map")
        torch.testing.assert_close(multi[:, k : k + 1], single, atol=1e-5, rtol=0)
