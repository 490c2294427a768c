"""The HF families of issue #10: DeiT, BEiT, data2vec-vision, ViT-MSN, I-JEPA, DINOv3, ViT-MAE,
AIMv2 and MetaCLIP 2, and the refusal of hierarchical families.

Tiny random-init models (2 layers, never ``from_pretrained``). Every model is built once with
``attn_implementation="eager"`` and once with ``"sdpa"`` carrying the same weights; the maps of
both are checked against the independent oracle in ``tests/oracle_hf_families.py`` (HF's own
``output_attentions`` on the eager twin).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

tf = pytest.importorskip("transformers")

from _versions import (  # noqa: E402
    expect_size_refused,
    hf_attn,
    hf_interpolates,
    require_hf,
)
from conftest import assert_not_vacuous, explainable  # noqa: E402
from oracle_hf import finalize  # noqa: E402
from oracle_hf_families import (  # noqa: E402
    aimv2_head_by_hand,
    family_readout,
    num_prefix,
    oracle_layer_maps,
)
from test_side_effects import assert_unchanged, snapshot  # noqa: E402

from captum_legrad import (  # noqa: E402
    CaptureError,
    ImageTextSimilarity,
    LeGrad,
    UnsupportedModelError,
    discover,
)

FINAL_TOL = 1e-5
LAYER_RTOL = 1e-4

_V: Dict[str, Any] = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=32,
    patch_size=8,
)
_T: Dict[str, Any] = dict(
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=64,
    vocab_size=64,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)


def _cfg(name: str, **extra: Any) -> Callable[[], Any]:
    return lambda: getattr(tf, name)(**{**_V, **extra})


def _pair(name: str, **extra: Any) -> Callable[[], Any]:
    return lambda: getattr(tf, name)(vision_config=_V, text_config=_T, **extra)


#: key -> (model class name, config factory, constructor kwargs); random init.
BUILDERS: Dict[str, Tuple[str, Callable[[], Any], Dict[str, Any]]] = {
    "deit": ("DeiTModel", _cfg("DeiTConfig"), {}),
    "deit_cls": ("DeiTForImageClassification", _cfg("DeiTConfig", num_labels=5), {}),
    "deit_teacher": (
        "DeiTForImageClassificationWithTeacher",
        _cfg("DeiTConfig", num_labels=5),
        {},
    ),
    "beit": ("BeitModel", _cfg("BeitConfig", use_relative_position_bias=True), {}),
    "beit_cls": (
        "BeitForImageClassification",
        _cfg("BeitConfig", num_labels=5, use_relative_position_bias=True),
        {},
    ),
    "beit_cls_token": (
        "BeitForImageClassification",
        _cfg(
            "BeitConfig",
            num_labels=5,
            use_mean_pooling=False,
            use_shared_relative_position_bias=True,
        ),
        {},
    ),
    "data2vec": (
        "Data2VecVisionForImageClassification",
        _cfg("Data2VecVisionConfig", num_labels=5, use_relative_position_bias=True),
        {},
    ),
    "msn": ("ViTMSNModel", _cfg("ViTMSNConfig"), {}),
    "msn_cls": ("ViTMSNForImageClassification", _cfg("ViTMSNConfig", num_labels=5), {}),
    "ijepa": ("IJepaModel", _cfg("IJepaConfig"), {}),
    "ijepa_cls": ("IJepaForImageClassification", _cfg("IJepaConfig", num_labels=5), {}),
    "dinov3": ("DINOv3ViTModel", _cfg("DINOv3ViTConfig", num_register_tokens=2), {}),
    "mae": ("ViTMAEModel", _cfg("ViTMAEConfig", mask_ratio=0.0), {}),
    "aimv2_vision": ("Aimv2VisionModel", _cfg("Aimv2VisionConfig"), {}),
    "aimv2": ("Aimv2Model", _pair("Aimv2Config", projection_dim=16), {}),
    "metaclip2": ("MetaClip2Model", _pair("MetaClip2Config", projection_dim=16), {}),
    "metaclip2_vision_model": (
        "MetaClip2VisionModel",
        _cfg("MetaClip2VisionConfig"),
        {},
    ),
    "metaclip2_vision": (
        "MetaClip2VisionModelWithProjection",
        _cfg("MetaClip2VisionConfig", projection_dim=16),
        {},
    ),
    "metaclip2_cls": (
        "MetaClip2ForImageClassification",
        _pair("MetaClip2Config", num_labels=5),
        {},
    ),
}
KEYS = sorted(BUILDERS)
MULTIMODAL = {"aimv2", "metaclip2"}
POOLED = {"aimv2", "aimv2_vision"}  # attention-pool heads


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random values for all-zero tensors HF initialises (heads, tokens, biases, tables).

    Their scale is HF's ``initializer_range`` (0.02), the scale of the weights: biases much
    larger than the weights (0.3 before) make every value vector ``V_j`` nearly the shared
    bias, so ``dO_i · V_j`` has one sign over all keys and whole layers' maps came out all
    zeros (BEiT, data2vec, I-JEPA, ViT-MAE, ViT-MSN, DINOv3), a vacuous comparison.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    return model


def make(key: str, attn: Optional[str] = None, seed: int = 0) -> nn.Module:
    """A fresh model; ``attn="sdpa"`` and ``"eager"`` carry the same weights (``None``:
    ``sdpa`` where the release has it for the class, else ``eager``)."""
    class_name, make_config, extra = BUILDERS[key]
    model_class = require_hf(class_name)
    attn = hf_attn(model_class, attn)
    models = []
    for implementation in ("eager", attn):
        config = make_config()
        config._attn_implementation = implementation
        torch.manual_seed(seed)
        models.append(model_class(config, **extra).eval())
    eager, model = models
    _randomize(eager, seed)
    model.load_state_dict(eager.state_dict())
    assert model.config._attn_implementation == attn
    return model


@functools.cache
def cached(key: str, attn: Optional[str] = None) -> nn.Module:
    """Shared read-only instance (tests that check side effects build their own)."""
    return make(key, attn)


def images(batch: int = 3, height: int = 32, width: int = 32, seed: int = 7) -> Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def _targets(batch: int = 3) -> Tensor:
    """Valid for 5 classes and for the 16- / 32-d embeddings."""
    return torch.tensor([1, 4, 2, 0, 3][:batch])


def _model_output(key: str, model: nn.Module, x: Tensor) -> Tensor:
    """The model's real output: logits, image embedding, pooled or CLS token."""
    m: Any = model
    if key in MULTIMODAL:
        return m.get_image_features(x).pooler_output
    if key == "mae":
        out = discover(model).image_forward(x)  # type: ignore[misc]
    else:
        out = m(x)
    for name in ("logits", "image_embeds", "pooler_output"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    if key == "ijepa":
        return out.last_hidden_state.mean(dim=1)
    return out.last_hidden_state[:, 0]


def _last_tokens(model: nn.Module, x: Tensor) -> Tensor:
    """``Z`` of the last block during a plain forward."""
    spec = discover(model)
    kept: List[Tensor] = []

    def keep(module: nn.Module, args: Any, output: Any) -> None:
        kept.append(output[0] if isinstance(output, (tuple, list)) else output)

    handle = spec.blocks[-1].register_forward_hook(keep)
    try:
        _model_output_via(model, x)
    finally:
        handle.remove()
    return kept[-1]


def _model_output_via(model: nn.Module, x: Tensor) -> None:
    spec = discover(model)
    (spec.image_forward or model)(x)  # type: ignore[operator]


def explained(model: nn.Module) -> nn.Module:
    """The model LeGrad explains: a classifier, or a feature model's embedding dimensions
    (``FeatureDirection`` with identity rows; ``LeGrad(model)`` refuses feature models)."""
    return explainable(model, images(1))


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
    assert spec.family == "hf"
    assert spec.num_layers == 2
    assert spec.num_prefix_tokens == num_prefix(model)
    assert spec.num_prefix_tokens == {"deit": 2, "dinov3": 3, "ijepa": 0, "aimv2": 0}.get(
        key.split("_")[0], 1
    )
    assert spec.patch_size == (8, 8)
    assert spec.grid_size(32, 48) == (4, 6)
    names = {type(a).__name__ for a in spec.attentions}
    assert len(names) == 1 and "Attention" in names.pop()
    assert (spec.pool_attention is not None) == (key in POOLED)
    assert all(any(b is m for m in spec.root.modules()) for b in spec.blocks)
    assert (spec.image_forward is not None) == (key in MULTIMODAL or key == "mae")


@pytest.mark.parametrize("key", KEYS)
def test_model_readout_is_the_model_output(key: str) -> None:
    model = cached(key)
    x = images()
    spec = discover(model)
    with torch.no_grad():
        real = _model_output(key, model, x)
        tokens = _last_tokens(model, x)
        torch.testing.assert_close(spec.model_readout(tokens), real, atol=1e-5, rtol=1e-5)
        # the oracle's hand-written readouts are the adapter's, both poolings
        for pooling in ("model", "mean"):
            ref, _ = family_readout(model, tokens, pooling)
            torch.testing.assert_close(ref, spec.read(pooling)(tokens), atol=1e-5, rtol=1e-5)


def test_aimv2_head_by_hand() -> None:
    head = cached("aimv2_vision").head
    feats = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pooled, attn = aimv2_head_by_hand(head, feats)
        torch.testing.assert_close(pooled, head(feats))
    assert attn.shape == (2, 2, 1, 16)


# ---------------------------------------------------------------------------- oracle


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("key", KEYS)
def test_matches_oracle(key: str, attn: str) -> None:
    model, eager = cached(key, attn), cached(key, "eager")
    x, target = images(), _targets()
    for pooling in ("mean", "model"):
        ref = oracle_layer_maps(eager, x, target, None, pooling)
        _assert_layers_close(
            LeGrad(explained(model), pooling=pooling).attribute_layers(x, target), ref
        )
        subsets = ((None, ref), ([-1], ref[:, -1:])) if pooling == "model" else ((None, ref),)
        for layers, selected in subsets:
            ours = LeGrad(explained(model), layers, pooling=pooling).attribute(
                x, target=target, output="map"
            )
            assert ours.shape == (3, 1, 32, 32)
            assert bool(torch.isfinite(ours).all())
            assert (ours - finalize(selected, (32, 32))).abs().max() <= FINAL_TOL, (pooling, layers)


@pytest.mark.parametrize("key", KEYS)
def test_sdpa_equals_eager(key: str) -> None:
    x, target = images(), _targets()
    maps = [
        LeGrad(explained(cached(key, attn))).attribute(
            x, target=target, output="grid", normalize=False
        )
        for attn in ("sdpa", "eager")
    ]
    _assert_layers_close(maps[0], maps[1])


@pytest.mark.parametrize("key", KEYS)
def test_batch_equivalence(key: str) -> None:
    model = cached(key)
    x, target = images(), _targets()
    explainer = LeGrad(explained(model))
    batch = explainer.attribute(x, target=target, output="map")
    for i in range(x.shape[0]):
        alone = explainer.attribute(x[i : i + 1], target=int(target[i]), output="map")
        torch.testing.assert_close(alone[0], batch[i], atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("key", KEYS)
def test_no_side_effects(key: str, attn: str) -> None:
    model = make(key, attn)
    x = images(2)
    before = snapshot(model)
    configs = {
        n: m.config._attn_implementation for n, m in model.named_modules() if hasattr(m, "config")
    }
    LeGrad(explained(model)).attribute(x, target=1)
    LeGrad(explained(model)).attribute_multi(x, targets=[0, 2])
    LeGrad(explained(model), pooling="model").attribute_layers(x, target=[1, 2])
    assert_unchanged(before, snapshot(model))
    after = {
        n: m.config._attn_implementation for n, m in model.named_modules() if hasattr(m, "config")
    }
    assert after == configs


# ---------------------------------------------------------------------------- ViT-MAE


def test_mae_map_is_in_image_order_and_deterministic() -> None:
    model = cached("mae")
    x, target = images(), _targets()
    first = LeGrad(explained(model)).attribute(x, target=target, output="grid", normalize=False)
    second = LeGrad(explained(model)).attribute(x, target=target, output="grid", normalize=False)
    assert torch.equal(first, second)
    # the model's own random shuffles: a noise given by the caller is honoured and undone
    for seed in (1, 2):
        noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(seed))
        ours = LeGrad(explained(model)).attribute(
            x, target=target, additional_forward_args=(noise,), output="grid", normalize=False
        )
        ref = oracle_layer_maps(cached("mae", "eager"), x, target, noise=noise)
        _assert_layers_close(ours, ref.sum(dim=1, keepdim=True))
        _assert_layers_close(ours, first)  # the encoder is permutation-equivariant


def test_mae_other_size_with_interpolation() -> None:
    model = cached("mae")
    x, target = images(2, 32, 48), torch.tensor([0, 3])
    if not hf_interpolates(model):
        expect_size_refused(
            lambda: LeGrad(explained(model)).attribute(x, target=target), model, "transformers 4.42"
        )
    ours = LeGrad(explained(model)).attribute(
        x, target=target, additional_forward_args=(None, True), output="map"
    )
    ref = oracle_layer_maps(
        cached("mae", "eager"), x, target, forward_kwargs={"interpolate_pos_encoding": True}
    )
    assert_not_vacuous(ref)
    assert (ours - finalize(ref, (32, 48))).abs().max() <= FINAL_TOL


def test_mae_called_by_another_function_is_refused() -> None:
    model = cached("mae")
    x = images(1)
    LeGrad(explained(model)).attribute(x, target=0)
    with pytest.raises(CaptureError):  # the order of a forward is used once, not again
        discover(model).patch_layout((x,), 17)
    with pytest.raises(CaptureError, match="forward_func"):
        # (a function's outputs are what its spec says: here, scores to explain)
        spec = dataclasses.replace(discover(model), scores_are_features=False)
        LeGrad(lambda x: model(x).last_hidden_state[:, 0], spec=spec).attribute(images(1), target=0)


def test_mae_with_masking_and_pretraining_are_refused() -> None:
    config = tf.ViTMAEConfig(**_V)  # mask_ratio=0.75
    with pytest.raises(UnsupportedModelError, match=r"mask_ratio=0\.0"):
        discover(tf.ViTMAEModel(config))
    with pytest.raises(UnsupportedModelError, match=r"model\.vit"):
        discover(tf.ViTMAEForPreTraining(tf.ViTMAEConfig(**_V, mask_ratio=0.0)))


# ---------------------------------------------------------------------------- other sizes


@pytest.mark.parametrize("key", ["dinov3", "beit_cls"])
def test_non_square(key: str) -> None:
    model, eager = cached(key), cached(key, "eager")
    x, target = images(2, 32, 48), torch.tensor([0, 3])
    if not hf_interpolates(model):
        expect_size_refused(
            lambda: LeGrad(explained(model)).attribute(x, target=target), model, "transformers 4.42"
        )
    kwargs = {} if key == "dinov3" else {"interpolate_pos_encoding": True}
    args = () if key == "dinov3" else (None, True)  # (labels, interpolate_pos_encoding)
    for pooling in ("mean", "model"):
        ours = LeGrad(explained(model), pooling=pooling).attribute(
            x, target=target, additional_forward_args=args or None, output="map"
        )
        ref = oracle_layer_maps(eager, x, target, None, pooling, forward_kwargs=kwargs)
        assert_not_vacuous(ref)
        assert ours.shape == (2, 1, 32, 48)
        assert (ours - finalize(ref, (32, 48))).abs().max() <= FINAL_TOL


# ---------------------------------------------------------------------------- image-text


def _tokenizer(prompts: List[str], padding: bool = True, return_tensors: str = "pt") -> dict:
    """A stand-in for the HF tokenizer: characters as ids, EOS (= pad) = 1 at the end."""
    ids = [[2 + ord(c) % 60 for c in prompt[:7]] + [1] for prompt in prompts]
    width = max(len(row) for row in ids)
    input_ids = torch.tensor([row + [1] * (width - len(row)) for row in ids])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
    return {"input_ids": input_ids, "attention_mask": mask}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("key", ["metaclip2", "aimv2", "metaclip2_vision"])
def test_image_text_similarity(key: str, attn: str) -> None:
    model = cached(key, attn)
    text = torch.randn(4, 16, generator=torch.Generator().manual_seed(3))
    sim = ImageTextSimilarity(model, text)
    x = images()
    with torch.no_grad():
        expected = F.normalize(_model_output(key, model, x), dim=-1) @ F.normalize(text, dim=-1).T
        torch.testing.assert_close(sim(x), expected, atol=1e-5, rtol=1e-5)
    target = torch.tensor([3, 0, 2])
    for pooling in ("mean", "model"):
        ours = LeGrad(sim, pooling=pooling).attribute(x, target=target, output="map")
        ref = oracle_layer_maps(cached(key, "eager"), x, target, None, pooling, text=text)
        assert_not_vacuous(ref)
        assert (ours - finalize(ref, (32, 32))).abs().max() <= FINAL_TOL
    multi = LeGrad(sim).attribute_multi(x, targets=[0, 1, 2, 3])
    for k in range(4):
        single = LeGrad(sim).attribute(x, target=k, output="map")
        torch.testing.assert_close(multi[:, k : k + 1], single, atol=1e-5, rtol=0)


@pytest.mark.parametrize("key", ["metaclip2", "aimv2", "metaclip2_vision"])
def test_image_text_similarity_sdpa_equals_eager(key: str) -> None:
    text = torch.randn(4, 16, generator=torch.Generator().manual_seed(3))
    x, target = images(), torch.tensor([3, 0, 2])
    maps = [
        LeGrad(ImageTextSimilarity(cached(key, attn), text)).attribute(
            x, target=target, output="grid", normalize=False
        )
        for attn in ("sdpa", "eager")
    ]
    _assert_layers_close(maps[0], maps[1])


@pytest.mark.parametrize("key", sorted(MULTIMODAL))
def test_image_text_similarity_from_prompts(key: str) -> None:
    model: Any = cached(key)
    prompts = ["a cat", "two dogs on grass", "car"]
    sim = ImageTextSimilarity.from_prompts(model, prompts, _tokenizer)
    with torch.no_grad():
        text = model.get_text_features(**_tokenizer(prompts)).pooler_output
    torch.testing.assert_close(sim.text_embeddings, F.normalize(text, dim=-1))
    maps = LeGrad(sim).attribute_multi(images(2), targets=[0, 1, 2])
    assert maps.shape == (2, 3, 32, 32) and bool(torch.isfinite(maps).all())


# ---------------------------------------------------------------------------- refusals

#: Hierarchical / local-attention families: (model class, config class, config kwargs).
REFUSED: Dict[str, Tuple[str, str, Dict[str, Any]]] = {
    "swin": (
        "SwinModel",
        "SwinConfig",
        dict(
            image_size=32,
            patch_size=4,
            embed_dim=16,
            depths=[1, 1],
            num_heads=[1, 2],
            window_size=4,
        ),
    ),
    "swinv2": (
        "Swinv2ForImageClassification",
        "Swinv2Config",
        dict(
            image_size=32,
            patch_size=4,
            embed_dim=16,
            depths=[1, 1],
            num_heads=[1, 2],
            window_size=4,
        ),
    ),
    "pvt_v2": (
        "PvtV2Model",
        "PvtV2Config",
        dict(hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 1, 1]),
    ),
    "segformer": (
        "SegformerForImageClassification",
        "SegformerConfig",
        dict(hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 1, 1]),
    ),
    "vitdet": (
        "VitDetModel",
        "VitDetConfig",
        dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=1),
    ),
}


@pytest.mark.parametrize("key", sorted(REFUSED))
def test_hierarchical_families_are_refused(key: str) -> None:
    class_name, config_name, kwargs = REFUSED[key]
    model = getattr(tf, class_name)(getattr(tf, config_name)(**kwargs))
    with pytest.raises(UnsupportedModelError, match="attends globally") as info:
        discover(model)
    assert class_name in str(info.value)
    with pytest.raises(UnsupportedModelError):
        LeGrad(model)


def test_dinov3_backbone_is_refused() -> None:
    require_hf("DINOv3ViTBackbone")
    config = tf.DINOv3ViTConfig(**_V, out_features=["stage2"])
    with pytest.raises(UnsupportedModelError, match="DINOv3ViTModel"):
        discover(tf.DINOv3ViTBackbone(config))
