"""Feature models without a head (issue #23): ``ImageImageSimilarity``, ``FeatureDirection``,
and ``LeGrad(feature_model)``'s refusal.

Each family is a tiny random-init model as it comes without a classifier: timm with
``num_classes=0`` (CLS, registers, MAP head), HF ``Dinov2Model``, ``DINOv3ViTModel``,
``CLIPVisionModelWithProjection``, ``SiglipVisionModel``, OpenCLIP (whole ``CLIP`` and
``.visual``, and a SigLIP ``TimmModel`` tower). The maps are compared with the independent
per-layer oracles (``tests/oracle.py``, ``oracle_hf.py``, ``oracle_hf_families.py``,
``oracle_mha.py``): the score of layer ``l`` is the cosine of that layer's readout with each
normalised reference (``ImageImageSimilarity``) or its projection on each direction
(``FeatureDirection``), one ``autograd.grad`` per layer on explicit probabilities.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import assert_not_vacuous, make_model
from oracle import oracle_layer_maps as timm_oracle
from oracle_mha import block_attention_maps, finish
from test_side_effects import assert_unchanged, snapshot
from torch import Tensor, nn

from captum_legrad import (
    FeatureDirection,
    ImageImageSimilarity,
    ImageTextSimilarity,
    LeGrad,
    UnsupportedModelError,
    ViTSpec,
    discover,
)

LAYER_RTOL = 1e-4
FINAL_TOL = 1e-5
GEN = torch.Generator().manual_seed(11)


def images(batch: int = 3, size: Tuple[int, int] = (32, 32), seed: int = 5) -> Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def assert_layers_close(ours: Tensor, ref: Tensor) -> None:
    assert ours.shape == ref.shape
    assert_not_vacuous(ref)
    assert (ours - ref).abs().max() <= LAYER_RTOL * ref.abs().max()


def cosines(references: Tensor) -> Callable[[Tensor], Tensor]:
    """The definition of the score: cosine of an embedding with each reference."""
    return lambda e: F.normalize(e, dim=-1) @ F.normalize(references, dim=-1).T


def projections(directions: Tensor, bias: Optional[Tensor] = None) -> Callable[[Tensor], Tensor]:
    return lambda e: e @ directions.T + (0 if bias is None else bias)


# ---------------------------------------------------------------------------- families


def timm_features(key: str) -> nn.Module:
    """conftest's tiny timm variant, built as a feature model (``num_classes=0``)."""
    return make_model(key, num_classes=0)


#: Family name -> (build, real embedding of images, per-layer oracle(model, x, target,
#: layers, pooling, project)). Built lazily: each needs its library.
Family = Tuple[
    Callable[[], nn.Module],
    Callable[[nn.Module, Tensor], Tensor],
    Callable[..., Tensor],
]


def _timm_family(key: str) -> Family:
    def embed(model: nn.Module, x: Tensor) -> Tensor:
        return model(x)  # num_classes=0: the pooled features

    def oracle(model, x, target, layers, pooling, project):  # type: ignore[no-untyped-def]
        return timm_oracle(model, x, target, layers, pooling, project=project)

    return (lambda: timm_features(key), embed, oracle)


def _hf_family(key: str) -> Family:
    pytest.importorskip("transformers")
    from oracle_hf import oracle_layer_maps
    from test_hf import make_hf

    def embed(model: nn.Module, x: Tensor) -> Tensor:
        out = model(x)
        return out.image_embeds if key == "clip_vision_proj" else out.pooler_output

    def oracle(model, x, target, layers, pooling, project):  # type: ignore[no-untyped-def]
        return oracle_layer_maps(model, x, target, layers, pooling, project=project)

    return (lambda: make_hf(key), embed, oracle)


def _dinov3_family() -> Family:
    pytest.importorskip("transformers")
    from oracle_hf_families import oracle_layer_maps
    from test_hf_families import make

    def embed(model: nn.Module, x: Tensor) -> Tensor:
        return model(x).pooler_output

    def oracle(model, x, target, layers, pooling, project):  # type: ignore[no-untyped-def]
        eager = make("dinov3", "eager")  # the same weights, HF's own eager probabilities
        return oracle_layer_maps(eager, x, target, layers, pooling, project=project)

    return (lambda: make("dinov3"), embed, oracle)


def _open_clip_family(what: str) -> Family:
    from test_open_clip import clip_model

    def build() -> nn.Module:
        model = clip_model()
        return model if what == "clip" else model.visual

    def embed(model: nn.Module, x: Tensor) -> Tensor:
        visual: Any = getattr(model, "visual", model)
        return visual(x)  # = encode_image(x, normalize=False)

    def oracle(model, x, target, layers, pooling, project):  # type: ignore[no-untyped-def]
        visual: Any = getattr(model, "visual", model)
        blocks = list(visual.transformer.resblocks)
        ids = list(range(len(blocks))) if layers is None else [i % len(blocks) for i in layers]

        def score(z: Tensor) -> Tensor:
            tokens = visual.ln_post(z.mean(1)) if pooling == "mean" else visual.ln_post(z)[:, 0]
            return project(tokens @ visual.proj).gather(1, target[:, None])[:, 0]

        batch_first = getattr(visual.transformer, "batch_first", False)
        return block_attention_maps(
            lambda: visual(x), blocks, [b.attn for b in blocks], score, ids, (4, 4), batch_first
        )

    return (build, embed, oracle)


FAMILIES: Dict[str, Callable[[], Family]] = {
    "timm_cls": lambda: _timm_family("vit"),
    "timm_registers": lambda: _timm_family("dinov2_reg"),
    "timm_map": lambda: _timm_family("siglip_map"),
    "hf_dinov2": lambda: _hf_family("dinov2"),
    "hf_dinov3": _dinov3_family,
    "hf_clip_vision_proj": lambda: _hf_family("clip_vision_proj"),
    "hf_siglip_vision": lambda: _hf_family("siglip_vision"),
    "open_clip": lambda: _open_clip_family("clip"),
    "open_clip_visual": lambda: _open_clip_family("visual"),
}
KEYS = sorted(FAMILIES)


def references(model: nn.Module, embed: Callable[[nn.Module, Tensor], Tensor]) -> Tensor:
    """Four reference embeddings: the model's own embeddings of four other images."""
    with torch.no_grad():
        return embed(model, images(4, seed=9))


# ---------------------------------------------------------------------------- the refusal


@pytest.mark.parametrize("key", KEYS)
def test_legrad_refuses_a_feature_model_and_points_at_the_wrappers(key: str) -> None:
    build, _, _ = FAMILIES[key]()
    model = build()
    assert discover(model).scores_are_features
    with pytest.raises(UnsupportedModelError, match="feature dimensions, not classes") as info:
        LeGrad(model)
    for name in ("ImageImageSimilarity", "ImageTextSimilarity", "FeatureDirection"):
        assert name in str(info.value)
    # the same through a wrapper found by discover, and through an explicit spec
    with pytest.raises(UnsupportedModelError):
        LeGrad(nn.Sequential(nn.Identity(), model))
    with pytest.raises(UnsupportedModelError):
        LeGrad(model, spec=discover(model))


def test_classifiers_are_not_feature_models() -> None:
    assert not discover(make_model("vit")).scores_are_features
    LeGrad(make_model("vit"))  # accepted
    pytest.importorskip("transformers")
    from test_hf import make_hf

    assert not discover(make_hf("dinov2_cls")).scores_are_features
    assert discover(make_hf("dinov2")).scores_are_features


# ---------------------------------------------------------------------------- ImageImageSimilarity


@pytest.mark.parametrize("key", KEYS)
def test_similarity_is_the_cosine_of_the_real_embedding(key: str) -> None:
    """The readout contract: ``sim(x)`` is cosine(model's embedding of x, references)."""
    build, embed, _ = FAMILIES[key]()
    model = build()
    refs = references(model, embed)
    x = images()
    sim = ImageImageSimilarity(model, refs)
    with torch.no_grad():
        expected = cosines(refs)(embed(model, x))
        torch.testing.assert_close(sim(x), expected, atol=1e-5, rtol=1e-5)
        # and the last layer read out with pooling="model" is that similarity
        tokens = {}
        spec = sim.legrad_spec()
        handle = spec.blocks[-1].register_forward_hook(
            lambda m, a, o: tokens.__setitem__("z", o[0] if isinstance(o, tuple) else o)
        )
        try:
            embed(model, x)
        finally:
            handle.remove()
        z = tokens["z"] if spec.batch_first else tokens["z"].transpose(0, 1)
        torch.testing.assert_close(spec.model_readout(z), expected, atol=1e-5, rtol=1e-5)
    assert not spec.scores_are_features
    # from_images embeds the references with the same model
    from_images = ImageImageSimilarity.from_images(model, images(4, seed=9))
    torch.testing.assert_close(
        from_images.reference_embeddings, F.normalize(refs, dim=-1), atol=1e-5, rtol=1e-5
    )
    assert not expected.std(dim=1).lt(1e-4).all(), "the references are indistinguishable"


@pytest.mark.parametrize("key", KEYS)
def test_image_similarity_matches_oracle(key: str) -> None:
    build, embed, oracle = FAMILIES[key]()
    model = build()
    refs = references(model, embed)
    x, target = images(), torch.tensor([3, 0, 2])
    sim = ImageImageSimilarity(model, refs)
    for pooling in ("mean", "model"):
        ref = oracle(model, x, target, None, pooling, cosines(refs))
        legrad = LeGrad(sim, pooling=pooling)
        assert_layers_close(legrad.attribute_layers(x, target=target), ref)
        final = legrad.attribute(x, target=target, output="map")
        assert (final - finish(ref, (32, 32))).abs().max() <= FINAL_TOL, pooling


@pytest.mark.parametrize("key", ["timm_cls", "hf_dinov2", "open_clip"])
def test_image_similarity_batches_multi_and_no_side_effects(key: str) -> None:
    build, _, _ = FAMILIES[key]()
    model = build()
    x, target = images(), torch.tensor([1, 3, 1])
    before = snapshot(model)
    state = {name: value.clone() for name, value in model.state_dict().items()}
    sim = ImageImageSimilarity.from_images(model, images(4, seed=9))
    legrad = LeGrad(sim)
    batched = legrad.attribute(x, target=target, output="map")
    multi = legrad.attribute_multi(x, targets=range(4))
    for i in range(3):  # batch = single
        alone = legrad.attribute(x[i : i + 1], target=int(target[i]), output="map")
        assert (alone[0] - batched[i]).abs().max() <= 1e-5
    for k in range(4):  # K references at once = K single calls
        single = legrad.attribute(x, target=k, output="map")
        assert (multi[:, k : k + 1] - single).abs().max() <= 1e-5
    assert (multi[:, 0] - multi[:, 1]).abs().max() > 1e-3  # the references differ
    assert_unchanged(before, snapshot(model))
    after = model.state_dict()
    assert state.keys() == after.keys()
    assert all(torch.equal(state[name], after[name]) for name in state)  # bitwise


def test_from_images_takes_references_of_other_sizes() -> None:
    """Each reference at its own size, as LeGrad would run it (the position embedding
    resampled for the call): the same embedding as a dynamic-size twin's."""
    model = make_model("vit", num_classes=0)
    dynamic = make_model("vit_dynamic", num_classes=0)  # same weights, timm resamples itself
    refs = [images(1, (48, 40), seed=2)[0], images(2, (32, 32), seed=3)]
    sim = ImageImageSimilarity.from_images(model, refs)
    with torch.no_grad():
        expected = torch.cat([dynamic(refs[0][None]), dynamic(refs[1])])
    torch.testing.assert_close(sim.reference_embeddings, F.normalize(expected, dim=-1))
    query = images(1, (40, 48))
    with torch.no_grad():
        torch.testing.assert_close(
            sim.similarity(sim.embed(query)), cosines(expected)(dynamic(query))
        )
    maps = LeGrad(sim).attribute_multi(query, targets=[0, 1, 2])
    assert maps.shape == (1, 3, 40, 48)


def test_bad_references_and_models_get_one_clear_error() -> None:
    model = make_model("vit", num_classes=0)
    x = images(1)
    with pytest.raises(ValueError, match=r"32 dimensions but the 3 reference embeddings have 7"):
        ImageImageSimilarity(model, torch.randn(3, 7))(x)
    with pytest.raises(ValueError, match=r"32 dimensions but the 3 reference"):
        LeGrad(ImageImageSimilarity(model, torch.randn(3, 7))).attribute(x, target=0)
    for bad in (torch.randn(7), torch.randn(0, 32), torch.ones(2, 32, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"\(K, D\)"):
            ImageImageSimilarity(model, bad)
    with pytest.raises(ValueError, match="multiple of"):
        ImageImageSimilarity.from_images(model, [images(1, (30, 32))[0]])
    with pytest.raises(UnsupportedModelError, match="returns class scores"):
        ImageImageSimilarity(make_model("vit"), torch.randn(2, 5))  # a classifier
    with pytest.raises(UnsupportedModelError, match="needs a model with an image embedding"):
        ImageImageSimilarity(nn.Linear(4, 4), torch.randn(2, 4))
    per_token = make_model("vit", num_classes=0, global_pool="")
    with pytest.raises(ValueError, match="per-token"):
        ImageImageSimilarity(per_token, torch.randn(2, 32))(x)


def test_a_custom_spec_says_its_readout_is_an_embedding() -> None:
    model = make_model("vit", num_classes=0)
    spec = discover(model)
    custom = ViTSpec(
        family="custom",
        root=spec.root,
        blocks=spec.blocks,
        attentions=spec.attentions,
        readout=spec.readout,
        model_readout=spec.model_readout,
        num_prefix_tokens=1,
        patch_size=(8, 8),
        grid=spec.grid,
    )
    with pytest.raises(UnsupportedModelError, match="scores_are_features=True"):
        ImageImageSimilarity(model, torch.randn(2, 32), spec=custom)
    with pytest.raises(ValueError, match="scores_are_features"):
        dataclasses.replace(custom, scores_are_features=1)
    refs = references(model, lambda m, x: m(x))
    marked = dataclasses.replace(custom, scores_are_features=True)
    ours = LeGrad(ImageImageSimilarity(model, refs, spec=marked)).attribute_multi(
        images(), targets=[0, 1]
    )
    torch.testing.assert_close(
        ours, LeGrad(ImageImageSimilarity(model, refs)).attribute_multi(images(), targets=[0, 1])
    )


# ---------------------------------------------------------------------------- FeatureDirection


@pytest.mark.parametrize("key", ["timm_registers", "hf_dinov2", "hf_siglip_vision", "open_clip"])
def test_feature_direction_matches_oracle(key: str) -> None:
    build, embed, oracle = FAMILIES[key]()
    model = build()
    x, target = images(), torch.tensor([2, 0, 1])
    with torch.no_grad():
        dim = embed(model, x).shape[-1]
    directions = torch.randn(3, dim, generator=GEN)
    bias = torch.randn(3, generator=GEN)
    explain = FeatureDirection(model, directions, bias)
    with torch.no_grad():
        torch.testing.assert_close(
            explain(x), projections(directions, bias)(embed(model, x)), atol=1e-5, rtol=1e-5
        )
    for pooling in ("mean", "model"):
        ref = oracle(model, x, target, None, pooling, projections(directions))
        legrad = LeGrad(explain, pooling=pooling)
        assert_layers_close(legrad.attribute_layers(x, target=target), ref)
        final = legrad.attribute(x, target=target, output="map")
        assert (final - finish(ref, (32, 32))).abs().max() <= FINAL_TOL
    # the bias does not change the maps
    unbiased = LeGrad(FeatureDirection(model, directions)).attribute(x, target=target)
    torch.testing.assert_close(unbiased, LeGrad(explain).attribute(x, target=target))


def test_feature_direction_identity_rows_are_the_dimensions() -> None:
    """``torch.eye(D)``: target k explains embedding dimension k (what LeGrad(model) did)."""
    model = make_model("vit", num_classes=0)
    x, target = images(), torch.tensor([4, 17, 30])
    explain = FeatureDirection(model, torch.eye(32))
    with torch.no_grad():
        torch.testing.assert_close(explain(x), model(x))
    ref = timm_oracle(model, x, target, None, "mean")
    assert_layers_close(LeGrad(explain).attribute_layers(x, target=target), ref)


def test_feature_direction_from_a_linear_probe_and_on_a_classifier() -> None:
    model = make_model("vit", num_classes=0)
    torch.manual_seed(0)
    probe = nn.Linear(32, 6)
    explain = FeatureDirection.from_linear(model, probe)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(explain(x), probe(model(x)))
    assert explain.directions is not probe.weight  # a copy: training the probe changes nothing
    # on a classifier a direction combines classes: e_1 - e_3 is class 1 against class 3
    classifier = make_model("vit")
    contrast = FeatureDirection(classifier, torch.tensor([[0.0, 1, 0, -1, 0]]))
    ref = timm_oracle(
        classifier,
        x,
        torch.zeros(3, dtype=torch.long),
        None,
        "mean",
        project=lambda s: s[:, 1:2] - s[:, 3:4],
    )
    assert_layers_close(LeGrad(contrast).attribute_layers(x, target=0), ref)
    with pytest.raises(ValueError, match=r"\(6,\)"):
        FeatureDirection(model, probe.weight, torch.zeros(5))
    with pytest.raises(ValueError, match=r"\(K, D\)"):
        FeatureDirection(model, torch.randn(32))
    with pytest.raises(TypeError):
        FeatureDirection.from_linear(model, nn.Conv2d(3, 3, 1))  # type: ignore[arg-type]


def test_image_text_similarity_keeps_working_on_feature_models() -> None:
    model = make_model("vit", num_classes=0)
    text = torch.randn(3, 32, generator=GEN)
    sim = ImageTextSimilarity(model, text)
    x, target = images(), torch.tensor([0, 2, 1])
    ref = timm_oracle(model, x, target, None, "mean", project=cosines(text))
    assert_layers_close(LeGrad(sim).attribute_layers(x, target=target), ref)
    with pytest.raises(ValueError, match="text embeddings have 7"):
        ImageTextSimilarity(model, torch.randn(2, 7))(x)


def test_timm_feature_model_as_it_comes() -> None:
    """``timm.create_model(..., num_classes=0)`` straight from timm (no conftest helper)."""
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_small_patch14_dinov2",
        pretrained=False,
        num_classes=0,
        img_size=28,
        embed_dim=32,
        depth=2,
        num_heads=2,
        init_values=None,
    ).eval()
    with pytest.raises(UnsupportedModelError):
        LeGrad(model)
    sim = ImageImageSimilarity.from_images(model, images(2, (28, 28), seed=4))
    maps = LeGrad(sim).attribute_multi(images(1, (28, 28)), targets=[0, 1])
    assert maps.shape == (1, 2, 28, 28) and bool((maps.flatten(2).amax(-1) == 1).all())
