"""OpenCLIP configurations of ``open_clip.list_models()``, shrunk, and the clear refusal of the
image towers that are not Vision Transformers.

The configurations are OpenCLIP's own (``open_clip.get_model_config``), shrunk to a tiny
image tower (width 32, 2 layers, 32x32 images of 8x8 patches) and a one-layer text tower,
built with random weights. ``VisionTransformer`` towers are checked against the independent
``nn.MultiheadAttention`` oracle of ``tests/oracle_mha.py`` with the readouts written out by
hand here (CLS token, the CLIPA patch average with ``final_ln_after_pool``, CoCa's attention
pool); towers wrapped through ``TimmModel`` (EVA, SigLIP 2, PE-Core, ViTamin, MobileCLIP-B)
are checked for their readout (= the model's ``encode_image``), batch = single and no side
effects (their exactness is the timm adapter's, tested in the timm tests).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Dict, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

open_clip = pytest.importorskip("open_clip")

from _versions import require_open_clip_config  # noqa: E402
from conftest import assert_not_vacuous, explainable  # noqa: E402
from oracle_mha import block_attention_maps, finish, pool_attention_maps  # noqa: E402
from test_open_clip import pooler_queries  # noqa: E402
from test_side_effects import assert_unchanged, snapshot  # noqa: E402

from captum_legrad import ImageTextSimilarity, LeGrad, UnsupportedModelError, discover  # noqa: E402

GEN = torch.Generator().manual_seed(0)


def tiny_config(name: str) -> Dict[str, Any]:
    """``name``'s OpenCLIP configuration with a tiny image and text tower."""
    require_open_clip_config(name)
    config = copy.deepcopy(open_clip.get_model_config(name))
    config["embed_dim"] = 16
    vision = config["vision_cfg"]
    vision.update(width=32, layers=2, head_width=16, patch_size=8, image_size=32)
    if "attn_pooler_heads" in vision:
        vision.update(attn_pooler_heads=2, **pooler_queries(4))
    for tower in ("text_cfg", "multimodal_cfg"):
        if tower in config:
            config[tower].update(width=32, heads=2, layers=1, context_length=16, vocab_size=100)
            config[tower].pop("hf_tokenizer_name", None)
    return config


def build(name: str) -> nn.Module:
    config = tiny_config(name)
    config.pop("custom_text", None)
    torch.manual_seed(0)
    model = open_clip.CoCa(**config) if "multimodal_cfg" in config else open_clip.CLIP(**config)
    return model.eval()


@contextlib.contextmanager
def tiny_timm() -> Iterator[None]:
    """``timm.create_model`` building tiny trunks, while OpenCLIP's TimmModel is built."""
    import open_clip.timm_model as tm

    original = tm.timm.create_model

    def create_model(name: str, **kwargs: Any) -> nn.Module:
        if name.startswith(("convnext", "fastvit", "swin")):
            kwargs["depths" if not name.startswith("fastvit") else "layers"] = (1, 1, 1, 1)
            return original(name, **kwargs)
        if name.startswith(HYBRID):  # convolutional stems: their own widths, 64x64 images
            return original(name, depth=2, img_size=64, **kwargs)
        return original(
            name, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, **kwargs
        )

    tm.timm.create_model = create_model
    try:
        yield
    finally:
        tm.timm.create_model = original


#: timm trunks with a convolutional stem, built at 64x64.
HYBRID = ("vitamin", "vit_base_mci")


def image_size(config: Dict[str, Any]) -> int:
    return 64 if config["vision_cfg"]["timm_model_name"].startswith(HYBRID) else 32


def build_timm(name: str) -> nn.Module:
    require_open_clip_config(name)
    config = copy.deepcopy(open_clip.get_model_config(name))
    config["embed_dim"] = 16
    config["vision_cfg"]["image_size"] = image_size(config)
    config["text_cfg"].update(width=32, heads=2, layers=1, context_length=16, vocab_size=100)
    config["text_cfg"].pop("hf_tokenizer_name", None)
    config.pop("custom_text", None)
    torch.manual_seed(0)
    with tiny_timm():
        model = open_clip.CustomTextCLIP(**config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # timm zero-initialises some heads and tokens
        for param in model.parameters():
            if param.dim() > 1 and not param.any():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    return model.eval()


def cosine(embedding: Tensor, prompts: Tensor, target: Tensor) -> Tensor:
    sims = F.normalize(embedding, dim=-1) @ F.normalize(prompts, dim=-1).T
    return sims.gather(1, target[:, None])[:, 0]


# ---------------------------------------------------------------------------- VisionTransformer

#: configuration -> its image-tower readout, as the config describes it.
VIT_CONFIGS = {
    "ViT-B-32": "tok",
    "ViT-B-16-quickgelu": "tok",
    "ViT-L-14-CLIPA": "avg_final_ln",
    "coca_ViT-B-32": "attn_pool",
}


def readout_by_hand(visual: Any, z: Tensor, kind: str, pooling: str) -> Tensor:
    """The image embedding from ``Z``: ``ln_post``, the pooling the config names, ``proj``."""
    if pooling == "mean":
        return visual.ln_post(z.mean(dim=1)) @ visual.proj
    if kind == "tok":
        return visual.ln_post(z[:, 0]) @ visual.proj
    if kind == "avg_final_ln":
        return visual.ln_post(z[:, 1:].mean(dim=1)) @ visual.proj
    raise ValueError(kind)


@pytest.mark.parametrize("pooling", ["mean", "model"])
@pytest.mark.parametrize("name", sorted(VIT_CONFIGS))
def test_vision_transformer_configs_match_oracle(name: str, pooling: str) -> None:
    model = build(name)
    visual: Any = model.visual
    kind = VIT_CONFIGS[name]
    x, target = torch.randn(3, 3, 32, 32, generator=GEN), torch.tensor([0, 3, 1])
    prompts = torch.randn(4, 16, generator=GEN)
    sim = ImageTextSimilarity(model, prompts)
    with torch.no_grad():
        expected = F.normalize(model.encode_image(x), dim=-1) @ F.normalize(prompts, dim=-1).T
        torch.testing.assert_close(sim(x), expected, atol=1e-5, rtol=1e-5)
    blocks = list(visual.transformer.resblocks)
    batch_first = getattr(visual.transformer, "batch_first", False)  # < 2.26: (N, B, D)
    if kind == "attn_pool":  # CoCa: the pooler's first query, ln_post after it, both poolings

        def pool_score(z: Tensor) -> Tensor:
            pooled = visual.ln_post(visual.attn_pool(z))[:, 0]
            return cosine(pooled @ visual.proj, prompts, target)

        per_layer = pool_attention_maps(
            lambda: visual(x),
            blocks,
            visual.attn_pool.attn,
            pool_score,
            [0, 1],
            (4, 4),
            query=0,
            batch_first=batch_first,
        )
    else:

        def score(z: Tensor) -> Tensor:
            return cosine(readout_by_hand(visual, z, kind, pooling), prompts, target)

        per_layer = block_attention_maps(
            lambda: visual(x), blocks, [b.attn for b in blocks], score, [0, 1], (4, 4), batch_first
        )
    legrad = LeGrad(sim, pooling=pooling)
    ours = legrad.attribute_layers(x, target=target)
    assert_not_vacuous(per_layer)
    assert (ours - per_layer).abs().max() <= 1e-4 * per_layer.abs().max()
    final = legrad.attribute(x, target=target, output="map")
    assert (final - finish(per_layer, (32, 32))).abs().max() <= 1e-5


# ---------------------------------------------------------------------------- TimmModel towers

TIMM_CONFIGS = ["EVA02-B-16", "ViT-B-16-SigLIP2", "PE-Core-T-16-384", "MobileCLIP-B", "ViTamin-S"]


@pytest.mark.parametrize("name", TIMM_CONFIGS)
def test_timm_towers_work(name: str) -> None:
    model = build_timm(name)
    spec = discover(model)
    assert spec.family == "open_clip" and spec.root is model.visual
    size = image_size(open_clip.get_model_config(name))
    x = torch.randn(2, 3, size, size, generator=GEN)
    tokens: list = []
    handle = spec.blocks[-1].register_forward_hook(lambda m, a, o: tokens.append(o))
    try:
        with torch.no_grad():
            real = model.encode_image(x)
    finally:
        handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(spec.model_readout(tokens[0]), real, atol=1e-5, rtol=1e-5)
    before = snapshot(model)
    explainer = LeGrad(explainable(model, x))  # the embedding's dimensions 1 and 5
    batch = explainer.attribute(x, target=torch.tensor([1, 5]), output="grid", normalize=False)
    assert bool(torch.isfinite(batch).all()) and bool((batch.flatten(1).amax(1) > 0).all())
    for i, t in enumerate((1, 5)):
        alone = explainer.attribute(x[i : i + 1], target=t, output="grid", normalize=False)
        torch.testing.assert_close(alone[0], batch[i], atol=1e-6, rtol=1e-4)
    assert_unchanged(before, snapshot(model))


# ---------------------------------------------------------------------------- refusals


def test_modified_resnet_is_refused() -> None:
    config = copy.deepcopy(open_clip.get_model_config("RN50"))
    config["vision_cfg"].update(layers=[1, 1, 1, 1], width=8, image_size=64)
    config["text_cfg"].update(width=32, heads=2, layers=1)
    model = open_clip.CLIP(**config).eval()
    for target in (model, model.visual):
        with pytest.raises(UnsupportedModelError, match="ModifiedResNet") as info:
            discover(target)
        assert "Vision Transformer" in str(info.value)


@pytest.mark.parametrize("name", ["convnext_tiny", "MobileCLIP-S1", "swin_base_patch4_window7_224"])
def test_non_vit_timm_towers_are_refused(name: str) -> None:
    require_open_clip_config(name)
    config = copy.deepcopy(open_clip.get_model_config(name))
    config["text_cfg"].update(width=32, heads=2, layers=1)
    config.pop("custom_text", None)
    with tiny_timm():
        model = open_clip.CustomTextCLIP(**config).eval()
    # The timm adapter refuses the trunk with its reason (what LeGrad needs, and ViTSpec).
    with pytest.raises(UnsupportedModelError, match="cannot be explained by LeGrad") as info:
        LeGrad(model)
    assert "global over the patch tokens" in str(info.value) and "ViTSpec" in str(info.value)
