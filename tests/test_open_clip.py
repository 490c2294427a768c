"""OpenCLIP (3.x in CI): CLIP, CoCa, SigLIP-through-TimmModel, the 2.23 sequence-first
layout, and parity with the reference package ``legrad-torch`` 1.1 (golden fixtures)."""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import json
from pathlib import Path
from typing import List, Optional

import open_clip
import pytest
import torch
import torch.nn.functional as F
from _versions import reason
from conftest import assert_not_vacuous
from oracle import _attention_pool_by_hand
from oracle_mha import block_attention_maps, finish, pool_attention_maps, relevance
from safetensors.torch import load_file
from test_side_effects import assert_unchanged, snapshot
from torch import Tensor, nn

from captum_legrad import ImageTextSimilarity, LeGrad, discover

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
GEN = torch.Generator().manual_seed(0)


#: Options open_clip 2.23 added, with the value that means what an older release always does.
_OLDER_BEHAVIOUR = {
    "no_ln_pre": False,
    "pos_embed_type": "learnable",
    "final_ln_after_pool": False,
    "no_causal_mask": False,
    "proj_bias": False,
    "mlp_ratio": 4.0,  # the text tower's, fixed before 2.23
}
_OLDER_POOL = {"vision_cfg": "tok", "text_cfg": "argmax"}


def known_options(config: dict) -> dict:
    """``config`` for the installed open_clip: options an older release lacks are dropped
    where their value is that release's fixed behaviour (else the test is skipped)."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    config = copy.deepcopy(config)
    queries = config["vision_cfg"].pop("attn_pooler_queries", None)
    if queries is not None:
        config["vision_cfg"].update(pooler_queries(queries))
    for tower, cfg_class in (("vision_cfg", CLIPVisionCfg), ("text_cfg", CLIPTextCfg)):
        fields = {f.name for f in dataclasses.fields(cfg_class)}
        older = {**_OLDER_BEHAVIOUR, "pool_type": _OLDER_POOL[tower]}
        for key in [k for k in config[tower] if k not in fields]:
            value = config[tower].pop(key)
            if key not in older or older[key] != value:
                pytest.skip(reason("open_clip", f"{tower}.{key}={value!r}", "open-clip-torch 2.23"))
    return config


def pooler_queries(n: int) -> dict:
    """The CoCa attention pooler's query count (``n_queries`` before open_clip 2.23)."""
    from open_clip.model import CLIPVisionCfg

    fields = {f.name for f in dataclasses.fields(CLIPVisionCfg)}
    return {"attn_pooler_queries" if "attn_pooler_queries" in fields else "n_queries": n}


def clip_model() -> open_clip.CLIP:
    config = known_options(json.loads((FIXTURES / "config.json").read_text()))
    model = open_clip.CLIP(**config)
    model.load_state_dict(load_file(FIXTURES / "model.safetensors"), strict=True)
    return model.eval()


def coca_model() -> nn.Module:
    torch.manual_seed(0)
    return open_clip.CoCa(
        embed_dim=32,
        multimodal_cfg=dict(width=32, context_length=16, heads=2, layers=1, vocab_size=100),
        text_cfg=dict(context_length=16, vocab_size=100, width=32, heads=2, layers=1),
        vision_cfg=dict(
            layers=3,
            width=40,
            head_width=8,
            patch_size=8,
            image_size=32,
            attentional_pool=True,
            **pooler_queries(4),
            attn_pooler_heads=2,
            output_tokens=True,
        ),
    ).eval()


def siglip_tower(monkeypatch: pytest.MonkeyPatch, proj: str) -> nn.Module:
    """open_clip's TimmModel around a tiny timm SigLIP (MAP head) trunk."""
    import open_clip.timm_model as tm

    tiny = functools.partial(
        tm.timm.create_model, img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2
    )
    monkeypatch.setattr(tm.timm, "create_model", tiny)
    torch.manual_seed(0)
    try:
        tower = tm.TimmModel(
            "vit_base_patch16_siglip_224", embed_dim=24, image_size=32, pool="map", proj=proj
        )
    except AssertionError as error:  # proj="none": open_clip 2.23
        what = f"TimmModel proj={proj!r} ({error})"
        pytest.skip(reason("open_clip", what, "open-clip-torch 2.23"))
    monkeypatch.undo()
    return tower.eval()


def require_map_head(tower: nn.Module) -> None:
    """Skip where the SigLIP tower lost its MAP head: timm < 1.0.11's
    ``reset_classifier(0, global_pool="map")`` drops ``attn_pool`` (the model then reads the
    first token), which open_clip < 2.23's TimmModel calls. The oracles need the head."""
    if getattr(tower, "trunk", None) is not None and tower.trunk.attn_pool is None:
        pytest.skip(
            f"timm {timm_version()} drops the MAP head in reset_classifier(global_pool='map') "
            "(fixed in timm 1.0.11); SigLIP towers need open-clip-torch 2.23"
        )


def timm_version() -> str:
    from _versions import version

    return version("timm")


def has_batch_first() -> bool:
    """open_clip >= 2.26 builds batch-first transformers; older ones are sequence-first."""
    from open_clip.transformer import Transformer

    return "batch_first" in inspect.signature(Transformer.__init__).parameters


def sequence_first(model: open_clip.CLIP) -> open_clip.CLIP:
    """The open_clip 2.23 layout: blocks exchange (N, B, D) tensors."""
    from open_clip.transformer import Transformer

    seq = copy.deepcopy(model)
    if not has_batch_first():  # this release has no other layout
        return seq
    old = seq.visual.transformer
    new = Transformer(width=40, layers=3, heads=5, mlp_ratio=4.0, batch_first=False)
    new.load_state_dict(old.state_dict())
    seq.visual.transformer = new.eval()
    return seq


def text(k: int = 4, dim: int = 32) -> Tensor:
    return torch.randn(k, dim, generator=GEN)


def cosine(embedding: Tensor, prompts: Tensor, target: Tensor) -> Tensor:
    sims = F.normalize(embedding, dim=-1) @ F.normalize(prompts, dim=-1).T
    return sims.gather(1, target[:, None])[:, 0]


def clip_oracle(model, x, prompts, target, layers: Optional[List[int]], pooling: str) -> Tensor:
    visual = model.visual
    blocks = list(visual.transformer.resblocks)
    ids = list(range(len(blocks))) if layers is None else sorted(i % len(blocks) for i in layers)

    def score(z: Tensor) -> Tensor:
        pooled = visual.ln_post(z.mean(1)) if pooling == "mean" else visual.ln_post(z)[:, 0]
        return cosine(pooled @ visual.proj, prompts, target)

    batch_first = getattr(visual.transformer, "batch_first", False)
    return block_attention_maps(
        lambda: visual(x), blocks, [b.attn for b in blocks], score, ids, (4, 4), batch_first
    )


# ------------------------------------------------------------------------------ CLIP


@pytest.mark.parametrize("pooling", ["mean", "model"])
@pytest.mark.parametrize("layers", [None, [-2, -1]])
@pytest.mark.parametrize("layout", ["batch_first", "sequence_first"])
def test_clip_matches_oracle(pooling: str, layers, layout: str) -> None:
    if layout == "batch_first" and not has_batch_first():
        pytest.skip(reason("open_clip", "batch-first Transformer", "open-clip-torch 2.26"))
    model = clip_model() if layout == "batch_first" else sequence_first(clip_model())
    assert discover(model).batch_first is (layout == "batch_first")
    x, prompts = torch.randn(3, 3, 32, 32, generator=GEN), text()
    target = torch.tensor([0, 3, 1])
    legrad = LeGrad(ImageTextSimilarity(model, prompts), layers, pooling=pooling)
    per_layer = clip_oracle(model, x, prompts, target, layers, pooling)
    assert_not_vacuous(per_layer)
    ours = legrad.attribute_layers(x, target=target)
    assert (ours - per_layer).abs().max() <= 1e-4 * per_layer.abs().max()
    assert (
        legrad.attribute(x, target=target, output="map") - finish(per_layer, (32, 32))
    ).abs().max() <= 1e-5


def test_sequence_first_equals_batch_first() -> None:
    if not has_batch_first():
        pytest.skip(reason("open_clip", "batch-first Transformer", "open-clip-torch 2.26"))
    x, prompts = torch.randn(2, 3, 32, 32, generator=GEN), text()
    a = LeGrad(ImageTextSimilarity(clip_model(), prompts)).attribute_multi(x, targets=range(4))
    seq = sequence_first(clip_model())
    b = LeGrad(ImageTextSimilarity(seq, prompts)).attribute_multi(x, targets=range(4))
    assert (a - b).abs().max() <= 1e-5


@pytest.mark.parametrize("what", ["clip", "visual"])
def test_similarity_forward_equals_model(what: str) -> None:
    model, prompts = clip_model(), text()
    x = torch.randn(2, 3, 32, 32, generator=GEN)
    sim = ImageTextSimilarity(model if what == "clip" else model.visual, prompts)
    with torch.no_grad():
        expected = F.normalize(model.encode_image(x), dim=-1) @ F.normalize(prompts, dim=-1).T
        torch.testing.assert_close(sim(x), expected, atol=1e-5, rtol=1e-5)
    assert sim(x).shape == (2, 4)


def test_from_prompts_with_open_clip_tokenizer() -> None:
    model = clip_model()
    vocab = open_clip.get_tokenizer("ViT-B-32")  # BPE vocabulary ships with open_clip

    def tokenizer(prompts: List[str]) -> Tensor:  # fit the tiny model's 100-token vocabulary
        return vocab(prompts, context_length=16) % 100

    prompts = ["a cat", "a dog", "a photo of a"]
    sim = ImageTextSimilarity.from_prompts(model, prompts, tokenizer)
    with torch.no_grad():
        expected = model.encode_text(tokenizer(prompts))
    torch.testing.assert_close(sim.text_embeddings, F.normalize(expected, dim=-1))
    maps = LeGrad(sim).attribute_multi(torch.randn(1, 3, 32, 32), targets=[0, 1, 2])
    assert maps.shape == (1, 3, 32, 32)


def test_clip_batches_and_no_side_effects() -> None:
    model, prompts = clip_model(), text()
    x, target = torch.randn(3, 3, 32, 32, generator=GEN), torch.tensor([2, 0, 2])
    before = snapshot(model)
    legrad = LeGrad(ImageTextSimilarity(model, prompts))
    batched = legrad.attribute(x, target=target, output="map")
    multi = legrad.attribute_multi(x, targets=range(4))
    assert_unchanged(before, snapshot(model))
    for i in range(3):
        alone = legrad.attribute(x[i : i + 1], target=int(target[i]), output="map")
        assert (alone[0] - batched[i]).abs().max() <= 1e-5
        assert (multi[i, int(target[i])] - batched[i, 0]).abs().max() <= 1e-5


def test_reference_parity() -> None:
    """Equal to legrad-torch 1.1 (LeWrapper.compute_legrad, layers [-2, -1]) to 1e-5."""
    meta = json.loads((FIXTURES / "meta.json").read_text())
    assert meta["versions"]["legrad-torch"] == "1.1"
    inputs = load_file(FIXTURES / "inputs.safetensors")
    reference = load_file(FIXTURES / "reference.safetensors")["maps"]  # (images, prompts, H, W)
    images, prompts = inputs["images"], inputs["text_embeddings"]
    model = clip_model()
    legrad = LeGrad(ImageTextSimilarity(model, prompts), layers=[-2, -1])
    ours = legrad.attribute_multi(images, targets=range(prompts.shape[0]))  # one batch
    assert ours.shape == reference.shape == (3, 4, 32, 32)
    assert (ours - reference).abs().max() <= 1e-5
    # also one prompt at a time, as attribute()
    for k in range(prompts.shape[0]):
        single = legrad.attribute(images, target=k, output="map")[:, 0]
        assert (single - reference[:, k]).abs().max() <= 1e-5


# ------------------------------------------------------------------------------ CoCa


@pytest.mark.parametrize("layers", [None, [-2, -1]])
def test_coca_matches_oracle(layers) -> None:
    model = coca_model()
    visual = model.visual
    spec = discover(model)
    assert spec.pool_attention is visual.attn_pool and spec.pool_query == 0
    x, prompts, target = torch.randn(2, 3, 32, 32, generator=GEN), text(), torch.tensor([1, 2])

    def score(z: Tensor) -> Tensor:  # the model's own readout; ln_post after the pooler
        pooled = visual.ln_post(visual.attn_pool(z))[:, 0]
        return cosine(pooled @ visual.proj, prompts, target)

    blocks = list(visual.transformer.resblocks)
    ids = list(range(3)) if layers is None else [1, 2]
    batch_first = getattr(visual.transformer, "batch_first", False)  # < 2.26: (N, B, D)
    per_layer = pool_attention_maps(
        lambda: visual(x), blocks, visual.attn_pool.attn, score, ids, (4, 4), 0, batch_first
    )
    assert_not_vacuous(per_layer)
    legrad = LeGrad(ImageTextSimilarity(model, prompts), layers)
    ours = legrad.attribute_layers(x, target=target)
    assert (ours - per_layer).abs().max() <= 1e-4 * per_layer.abs().max()
    final = legrad.attribute(x, target=target, output="map")
    assert (final - finish(per_layer, (32, 32))).abs().max() <= 1e-5
    # the similarity is the model's own image embedding
    with torch.no_grad():
        emb = model.encode_image(x, normalize=False)
        expected = F.normalize(emb, dim=-1) @ F.normalize(prompts, dim=-1).T
        torch.testing.assert_close(ImageTextSimilarity(model, prompts)(x), expected)


# ------------------------------------------------------------------------------ SigLIP


@pytest.mark.parametrize("proj", ["none", "linear"])
def test_siglip_timm_tower_matches_oracle(monkeypatch: pytest.MonkeyPatch, proj: str) -> None:
    tower = siglip_tower(monkeypatch, proj)
    trunk = tower.trunk
    require_map_head(tower)
    spec = discover(tower)
    assert spec.family == "open_clip" and spec.num_prefix_tokens == 0
    dim = 24 if proj == "linear" else trunk.num_features
    x, target = torch.randn(2, 3, 32, 32, generator=GEN), torch.tensor([0, 2])
    prompts = text(3, dim)
    with torch.no_grad():
        expected = F.normalize(tower(x), dim=-1) @ F.normalize(prompts, dim=-1).T
        torch.testing.assert_close(ImageTextSimilarity(tower, prompts)(x), expected)

    outputs: dict = {}
    hooks = [
        b.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o))
        for i, b in enumerate(trunk.blocks)
    ]
    try:
        with torch.no_grad():
            tower(x)
    finally:
        for h in hooks:
            h.remove()
    maps = []
    with torch.enable_grad():
        for i in range(3):
            z = outputs[i].detach().requires_grad_()
            pooled, attn = _attention_pool_by_hand(trunk.attn_pool, trunk.norm(z))
            embedding = tower.head(trunk.head(trunk.fc_norm(pooled)))
            (g,) = torch.autograd.grad(cosine(embedding, prompts, target).sum(), attn)
            maps.append(relevance(g, (4, 4)))
    per_layer = torch.stack(maps, 1)
    assert_not_vacuous(per_layer)
    legrad = LeGrad(ImageTextSimilarity(tower, prompts))
    ours = legrad.attribute_layers(x, target=target)
    assert (ours - per_layer).abs().max() <= 1e-4 * per_layer.abs().max()
    final = legrad.attribute(x, target=target, output="map")
    assert (final - finish(per_layer, (32, 32))).abs().max() <= 1e-5


def test_open_clip_models_are_discovered_whole_or_visual() -> None:
    model = clip_model()
    for candidate in (model, model.visual):
        spec = discover(candidate)
        assert spec.root is model.visual and spec.num_layers == 3 and spec.patch_size == (8, 8)
    with pytest.raises(TypeError):
        LeGrad(model.text if hasattr(model, "text") else model.transformer)


def test_empty_prompt_correction_is_optional_and_follows_the_reference() -> None:
    """The reference's SigLIP correction: zero where minmax(empty map) > 0.8, on the grid."""
    model, prompts = clip_model(), text(4)
    x = torch.randn(2, 3, 32, 32, generator=GEN)
    legrad = LeGrad(ImageTextSimilarity(model, prompts))  # prompt 3 plays the empty prompt
    grid = legrad.attribute_multi(x, targets=[0, 1, 3], output="grid", normalize=False)
    empty = grid[:, 2:3]
    span = empty.amax((2, 3), keepdim=True) - empty.amin((2, 3), keepdim=True)
    mask = (empty - empty.amin((2, 3), keepdim=True)) / span > 0.8
    assert 0 < int(mask.sum()) < mask.numel()  # the test exercises a real mask
    expected = torch.where(mask, torch.zeros_like(grid[:, :2]), grid[:, :2])
    up = F.interpolate(expected, size=(32, 32), mode="bilinear", align_corners=False)
    lo, hi = up.amin((2, 3), keepdim=True), up.amax((2, 3), keepdim=True)
    got = legrad.attribute_multi(x, targets=[0, 1], empty_target=3)
    assert (got - (up - lo) / (hi - lo)).abs().max() <= 1e-5
    single = legrad.attribute(x, target=1, empty_target=3, output="map")
    assert (single[:, 0] - got[:, 1]).abs().max() <= 1e-5
    # off by default
    plain = legrad.attribute_multi(x, targets=[0, 1])
    assert (plain - got).abs().max() > 1e-3
