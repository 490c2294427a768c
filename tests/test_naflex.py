"""NaFlex models (per-sample patch grids): HF SigLIP2 and timm NaFlexVit.

Every number is compared with ``tests/oracle_naflex.py`` (independent: eager attention, one
``autograd.grad`` per layer, each sample alone with only its valid patches), so a padded
batch that equals the oracle also shows batch ≡ single and that padding keys are excluded.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_legrad import ImageTextSimilarity, LeGrad, discover
from captum_legrad.errors import CaptureError
from tests._versions import require, require_hf, require_timm_model
from tests.conftest import explainable
from tests.oracle_naflex import finalize_one, naflexvit_layer_maps, siglip2_layer_maps

tf = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

P = 4  # patch size
#: Two samples with different, non-square grids (3x4 and 2x3) in N = 14 rows (padding 2, 8).
SHAPES = torch.tensor([[3, 4], [2, 3]])
N_ROWS = 14


def _state(model: nn.Module) -> Dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, before: Dict[str, Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


# --------------------------------------------------------------------------------------------
# HF SigLIP2
# --------------------------------------------------------------------------------------------


def _vision_config(head: bool = True) -> Any:
    return tf.Siglip2VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        patch_size=P,
        num_patches=16,
        vision_use_head=head,
    )


def _siglip2(kind: str, attn: str = "sdpa", seed: int = 0) -> nn.Module:
    require_hf("Siglip2VisionModel")
    torch.manual_seed(seed)
    if kind == "model":
        text = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            vocab_size=50,
            max_position_embeddings=8,
        )
        config = tf.Siglip2Config(text_config=text, vision_config=_vision_config().to_dict())
        model = tf.Siglip2Model(config)
    elif kind == "classifier":
        config = tf.Siglip2Config(vision_config=_vision_config().to_dict())
        config.num_labels = 5
        model = tf.Siglip2ForImageClassification(config)
    else:
        model = tf.Siglip2VisionModel(_vision_config(head=kind == "vision_head"))
    model.set_attn_implementation(attn)
    return model.eval()


def _siglip2_batch(seed: int = 3) -> Tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(2, N_ROWS, P * P * 3, generator=gen)
    mask = torch.zeros(2, N_ROWS, dtype=torch.long)
    for b, (h, w) in enumerate(SHAPES.tolist()):
        mask[b, : h * w] = 1
        pixels[b, h * w :] = 0.0  # the processor pads with zeros
    return pixels, mask, SHAPES.clone()


def _siglip2_oracle(model: nn.Module, pixels: Tensor, targets: list, **kwargs: Any) -> list:
    """Oracle per-layer maps of each sample alone, on its valid rows only."""
    out = []
    for b, (h, w) in enumerate(SHAPES.tolist()):
        out.append(siglip2_layer_maps(model, pixels[b, : h * w], (h, w), targets[b], **kwargs))
    return out


SIGLIP2_KINDS = ["vision_head", "vision_nohead", "classifier"]


def as_explained(model: nn.Module) -> nn.Module:
    """A classifier as it is; a feature model's embedding dimensions through
    ``FeatureDirection`` with identity rows (``LeGrad(model)`` refuses feature models)."""
    return explainable(model, *_siglip2_batch())


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", SIGLIP2_KINDS)
def test_siglip2_matches_oracle(kind: str, attn: str) -> None:
    model = _siglip2(kind, attn)
    pixels, mask, shapes = _siglip2_batch()
    targets = [1, 4]
    legrad = LeGrad(as_explained(model), pooling="model")
    extra = (mask, shapes)
    grid = legrad.attribute(pixels, torch.tensor(targets), extra, output="grid", normalize=False)
    maps = legrad.attribute(pixels, torch.tensor(targets), extra, output="map")
    assert grid.shape == (2, 1, 3, 4) and maps.shape == (2, 1, 3 * P, 4 * P)
    for b, ref in enumerate(_siglip2_oracle(model, pixels, targets, pooling="model")):
        h, w = SHAPES[b].tolist()
        own = grid[b, 0, :h, :w]
        torch.testing.assert_close(own, ref.sum(0), rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
        assert own.abs().max() > 0
        # padding cells and padding pixels are zero
        assert grid[b, 0].sum() == pytest.approx(float(own.sum()))
        expected = finalize_one(ref, (h * P, w * P))
        torch.testing.assert_close(maps[b, 0, : h * P, : w * P], expected, atol=1e-4, rtol=0)
        assert not maps[b, 0, h * P :].any() and not maps[b, 0, :, w * P :].any()


def test_siglip2_mean_pooling_and_layers_match_oracle() -> None:
    model = _siglip2("vision_nohead", "eager")
    pixels, mask, shapes = _siglip2_batch()
    per_layer = LeGrad(as_explained(model), layers=[-1]).attribute_layers(pixels, 2, (mask, shapes))
    for b, ref in enumerate(_siglip2_oracle(model, pixels, [2, 2], layers=[-1])):
        h, w = SHAPES[b].tolist()
        torch.testing.assert_close(per_layer[b, :, :h, :w], ref, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kind", [*SIGLIP2_KINDS, "model", "similarity"])
def test_siglip2_sdpa_equals_eager(kind: str) -> None:
    """Per-sample grids (a padded batch of two grids), and the patch-sequence input form."""
    pixels, mask, shapes = _siglip2_batch()
    grids, inputs = [], []
    for attn in ("sdpa", "eager"):
        model: Any = _siglip2("model" if kind == "similarity" else kind, attn)
        explained: nn.Module = model
        if kind == "similarity":
            ids = torch.randint(0, 50, (3, 8), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                text = model.get_text_features(input_ids=ids)
            explained = ImageTextSimilarity(model, getattr(text, "pooler_output", text))
        legrad = LeGrad(as_explained(explained))
        target = torch.tensor([2, 0])
        grids.append(
            legrad.attribute(pixels, target, (mask, shapes), output="grid", normalize=False)
        )
        inputs.append(legrad.attribute(pixels, target, (mask, shapes), output="input"))
    assert grids[1].shape == (2, 1, 3, 4)
    for b, (h, w) in enumerate(SHAPES.tolist()):  # each sample's own grid is not all zeros
        assert grids[1][b, 0, :h, :w].abs().max() > 0
    torch.testing.assert_close(
        grids[0], grids[1], rtol=1e-4, atol=1e-4 * float(grids[1].abs().max())
    )
    assert inputs[1].shape == pixels.shape
    torch.testing.assert_close(inputs[0], inputs[1], atol=1e-5, rtol=0)


def test_siglip2_batch_equals_single_and_chunks() -> None:
    model = _siglip2("vision_head")
    pixels, mask, shapes = _siglip2_batch()
    legrad = LeGrad(as_explained(model))
    batch = legrad.attribute(pixels, 1, (mask, shapes), output="map")
    chunked = legrad.attribute(pixels, 1, (mask, shapes), output="map", internal_batch_size=1)
    torch.testing.assert_close(batch, chunked)
    for b, (h, w) in enumerate(SHAPES.tolist()):
        n = h * w  # alone: no padding rows at all
        single = legrad.attribute(
            pixels[b : b + 1, :n], 1, (mask[b : b + 1, :n], shapes[b : b + 1]), output="map"
        )
        assert single.shape == (1, 1, h * P, w * P)
        torch.testing.assert_close(batch[b : b + 1, :, : h * P, : w * P], single, atol=1e-5, rtol=0)


def test_siglip2_padding_rows_never_matter() -> None:
    model = _siglip2("vision_nohead")
    pixels, mask, shapes = _siglip2_batch()
    noisy = pixels.clone()
    noisy[mask == 0] = 100.0 * torch.randn(int((mask == 0).sum()), pixels.shape[-1])
    legrad = LeGrad(as_explained(model))
    clean = legrad.attribute(pixels, 0, (mask, shapes), output="grid", normalize=False)
    dirty = legrad.attribute(noisy, 0, (mask, shapes), output="grid", normalize=False)
    torch.testing.assert_close(clean, dirty, rtol=1e-4, atol=1e-7)


def test_siglip2_input_form_is_the_patch_sequence() -> None:
    model = _siglip2("vision_head")
    pixels, mask, shapes = _siglip2_batch()
    legrad = LeGrad(as_explained(model))
    as_input = legrad.attribute(pixels, 0, (mask, shapes))
    as_map = legrad.attribute(pixels, 0, (mask, shapes), output="map")
    assert as_input.shape == pixels.shape
    for b, (h, w) in enumerate(SHAPES.tolist()):
        # the processor's patchify: (C, h, p, w, p) -> (h, w, p, p, C) rows
        image = as_map[b, :, : h * P, : w * P].expand(3, -1, -1)
        rows = image.reshape(3, h, P, w, P).permute(1, 3, 2, 4, 0).reshape(h * w, -1)
        torch.testing.assert_close(as_input[b, : h * w], rows)
        assert not as_input[b, h * w :].any()
    multi = legrad.attribute_multi(pixels, [0, 1], (mask, shapes), output="input")
    assert multi.shape == (2, 2, *pixels.shape[1:])
    torch.testing.assert_close(multi[:, 0], as_input)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_siglip2_model_unchanged(attn: str) -> None:
    model = _siglip2("model", attn)
    before = _state(model)
    pixels, mask, shapes = _siglip2_batch()
    LeGrad(as_explained(model)).attribute(pixels, 0, (mask, shapes))
    _assert_unchanged(model, before)
    assert model.config._attn_implementation == attn
    assert model.vision_model.config._attn_implementation == attn


def test_siglip2_model_explains_image_features_and_text_similarity() -> None:
    model = _siglip2("model")
    spec = discover(model)
    assert spec.image_forward is not None and spec.pool_attention is not None
    pixels, mask, shapes = _siglip2_batch()
    with torch.no_grad():
        ids = torch.randint(0, 50, (3, 8), generator=torch.Generator().manual_seed(0))
        text = model.get_text_features(input_ids=ids)
        text = getattr(text, "pooler_output", text)
        image = model.get_image_features(pixels, mask, shapes)
        image = getattr(image, "pooler_output", image)
    sim = ImageTextSimilarity(model, text)
    expected = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    torch.testing.assert_close(sim(pixels, mask, shapes), expected, rtol=1e-4, atol=1e-5)
    maps = LeGrad(sim).attribute_multi(
        pixels, [0, 2], (mask, shapes), output="grid", normalize=False
    )
    for b, (h, w) in enumerate(SHAPES.tolist()):
        for k, prompt in enumerate([0, 2]):
            ref = siglip2_layer_maps(model, pixels[b, : h * w], (h, w), prompt, text=text)
            torch.testing.assert_close(
                maps[b, k, :h, :w], ref.sum(0), rtol=1e-4, atol=1e-4 * float(ref.abs().max())
            )

    def tokenizer(prompts: list, padding: bool, return_tensors: str) -> Dict[str, Tensor]:
        return {"input_ids": ids[: len(prompts)]}  # no vocabulary offline: fixed ids

    from_prompts = ImageTextSimilarity.from_prompts(model, ["a", "b", "c"], tokenizer)
    torch.testing.assert_close(from_prompts.get_buffer("text_embeddings"), sim.text_embeddings)


def test_siglip2_errors_say_what_to_pass() -> None:
    model = _siglip2("vision_head")
    pixels, mask, shapes = _siglip2_batch()
    with pytest.raises((TypeError, CaptureError), match="pixel_attention_mask"):
        LeGrad(as_explained(model)).attribute(pixels, 0)
    with pytest.raises(ValueError, match="patch sequence"):
        LeGrad(as_explained(model)).attribute(pixels[0], 0, (mask, shapes))


# --------------------------------------------------------------------------------------------
# timm NaFlexVit
# --------------------------------------------------------------------------------------------

NAFLEX_TINY = dict(
    pretrained=False,
    embed_dim=32,
    depth=2,
    num_heads=4,
    num_classes=5,
    patch_size=P,
    init_values=None,
)


def _naflexvit(arch: str, seed: int = 0, **extra: Any) -> nn.Module:
    require_timm_model(arch)
    torch.manual_seed(seed)
    model = timm.create_model(arch, **NAFLEX_TINY, **extra)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # timm zero-inits some weights: randomise them so tests can fail
        for param in model.parameters():
            if param.dim() > 1 and not param.any():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    return model.eval()


def _naflex_batch(seed: int = 5, shuffled: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """Two samples, grids 3x4 and 2x3: row-major patches then padding rows (timm's NaFlex
    collator), or (``shuffled``) patches in random order among padding rows at random
    positions, which only coordinate-based position embeddings (``pos_embed_use_grid_sample``)
    read correctly (timm's default adds the embeddings in row order)."""
    gen = torch.Generator().manual_seed(seed)
    patches = torch.randn(2, N_ROWS, P * P * 3, generator=gen)
    coord = torch.zeros(2, N_ROWS, 2, dtype=torch.long)
    valid = torch.zeros(2, N_ROWS, dtype=torch.bool)
    for b, (h, w) in enumerate(SHAPES.tolist()):
        cells = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1)
        rows = torch.randperm(N_ROWS, generator=gen)[: h * w] if shuffled else torch.arange(h * w)
        order = torch.randperm(h * w, generator=gen) if shuffled else torch.arange(h * w)
        coord[b, rows] = cells.reshape(-1, 2)[order]
        valid[b, rows] = True
    return patches, coord, valid


NAFLEX_ARCHS = ["naflexvit_base_patch16_gap", "naflexvit_base_patch16_map"]


@pytest.mark.parametrize("pooling", ["mean", "model"])
@pytest.mark.parametrize("arch", [*NAFLEX_ARCHS, "shuffled"])
def test_naflexvit_patch_dict_matches_oracle(arch: str, pooling: str) -> None:
    shuffled = arch == "shuffled"
    if shuffled:
        model = _naflexvit(NAFLEX_ARCHS[1], pos_embed_use_grid_sample=True)
    else:
        model = _naflexvit(arch)
    patches, coord, valid = _naflex_batch(shuffled=shuffled)
    targets = [2, 3]
    legrad = LeGrad(model, pooling=pooling)
    extra = (coord, valid)
    grid = legrad.attribute(patches, torch.tensor(targets), extra, output="grid", normalize=False)
    maps = legrad.attribute(patches, torch.tensor(targets), extra, output="map")
    assert grid.shape == (2, 1, 3, 4) and maps.shape == (2, 1, 3 * P, 4 * P)
    for b, (h, w) in enumerate(SHAPES.tolist()):
        ref = naflexvit_layer_maps(
            model, patches[b, valid[b]], coord[b, valid[b]], targets[b], pooling=pooling
        )
        assert ref.shape[-2:] == (h, w)
        own = grid[b, 0, :h, :w]
        torch.testing.assert_close(own, ref.sum(0), rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
        assert own.abs().max() > 0 and grid[b, 0].sum() == pytest.approx(float(own.sum()))
        torch.testing.assert_close(
            maps[b, 0, : h * P, : w * P], finalize_one(ref, (h * P, w * P)), atol=1e-4, rtol=0
        )
        assert not maps[b, 0, h * P :].any() and not maps[b, 0, :, w * P :].any()


@pytest.mark.parametrize("arch", NAFLEX_ARCHS)
def test_naflexvit_image_input_matches_oracle_and_patches(arch: str) -> None:
    require("timm.models.naflexvit", since="timm 1.0.16")
    from timm.models.naflexvit import batch_patchify

    model = _naflexvit(arch)
    images = torch.randn(2, 3, 3 * P, 5 * P, generator=torch.Generator().manual_seed(2))
    legrad = LeGrad(model)
    grid = legrad.attribute(images, 1, output="grid", normalize=False)
    full = legrad.attribute(images, 1)
    assert grid.shape == (2, 1, 3, 5) and full.shape == images.shape
    patches, (g_h, g_w) = batch_patchify(images, (P, P))
    cells = torch.stack(torch.meshgrid(torch.arange(g_h), torch.arange(g_w), indexing="ij"), -1)
    coord = cells.reshape(1, -1, 2).expand(2, -1, -1)
    for b in range(2):
        ref = naflexvit_layer_maps(model, patches[b], coord[b], 1)
        scale = float(ref.abs().max())
        torch.testing.assert_close(grid[b, 0], ref.sum(0), rtol=1e-4, atol=1e-4 * scale)
    valid = torch.ones(2, g_h * g_w, dtype=torch.bool)
    as_patches = legrad.attribute(patches, 1, (coord, valid))
    assert as_patches.shape == patches.shape
    expected, _ = batch_patchify(full, (P, P))  # the image-form map, patchified like the input
    torch.testing.assert_close(as_patches, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("extra", [{}, {"rope_type": "axial", "pos_embed": "none"}])
def test_naflexvit_batch_equals_single_and_chunks(extra: Dict[str, Any]) -> None:
    model = _naflexvit("naflexvit_base_patch16_gap", **extra)  # rope: EvaBlock, AttentionRope
    patches, coord, valid = _naflex_batch()
    legrad = LeGrad(model)
    batch = legrad.attribute(patches, 4, (coord, valid), output="map")
    chunked = legrad.attribute(patches, 4, (coord, valid), output="map", internal_batch_size=1)
    torch.testing.assert_close(batch, chunked)
    for b, (h, w) in enumerate(SHAPES.tolist()):
        keep = valid[b]
        alone = (coord[b : b + 1, keep], valid[b : b + 1, keep])
        single = legrad.attribute(patches[b : b + 1, keep], 4, alone, output="map")
        torch.testing.assert_close(batch[b : b + 1, :, : h * P, : w * P], single, atol=1e-5, rtol=0)


def test_naflexvit_model_unchanged_and_dict_helper() -> None:
    from captum_legrad.adapters.timm.naflex import naflex_arguments

    model = _naflexvit("naflexvit_base_patch16_map", pos_embed_use_grid_sample=True)
    before = _state(model)
    patches, coord, valid = _naflex_batch(shuffled=True)
    batch = {"patches": patches, "patch_coord": coord, "patch_valid": valid}
    inputs, extra = naflex_arguments(batch)
    out = LeGrad(model).attribute(inputs, 0, extra)
    assert out.shape == patches.shape and not out[~valid].any() and out[valid].any()
    _assert_unchanged(model, before)
    empty = valid.clone()
    empty[1] = False
    with pytest.raises(CaptureError, match="no valid patch"):
        LeGrad(model).attribute(patches, 0, (coord, empty))
    with pytest.raises(ValueError, match="lacks"):
        naflex_arguments({"patches": patches})


# --------------------------------------------------------------------------------------------
# Baselines on per-sample grids
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["RawAttention", "AttentionRollout"])
def test_siglip2_baselines_batch_equals_single(method: str) -> None:
    from captum_legrad import baselines

    model = _siglip2("vision_nohead")
    pixels, mask, shapes = _siglip2_batch()
    explainer = getattr(baselines, method)(model)
    batch = explainer.attribute(pixels, None, (mask, shapes), output="map")
    assert batch.shape == (2, 1, 3 * P, 4 * P)
    for b, (h, w) in enumerate(SHAPES.tolist()):
        n = h * w
        alone = explainer.attribute(
            pixels[b : b + 1, :n], None, (mask[b : b + 1, :n], shapes[b : b + 1]), output="map"
        )
        torch.testing.assert_close(
            batch[b : b + 1, :, : h * P, : w * P], alone, rtol=1e-4, atol=1e-6
        )
        assert batch[b, 0, : h * P, : w * P].any()
        assert not batch[b, 0, h * P :].any() and not batch[b, 0, :, w * P :].any()


@pytest.mark.parametrize(
    "method", ["RawAttention", "AttentionRollout", "GenericAttention", "ViTGradCAM"]
)
def test_naflexvit_baselines_patches_equal_images(method: str) -> None:
    """The same images as (B, C, H, W) and as timm's patch dictionary give the same maps;
    in a padded batch each sample gets what it gets alone."""
    require("timm.models.naflexvit", since="timm 1.0.16")
    from timm.models.naflexvit import batch_patchify

    from captum_legrad import baselines

    model = _naflexvit("naflexvit_base_patch16_gap")
    explainer = getattr(baselines, method)(model)
    images = torch.randn(1, 3, 3 * P, 4 * P, generator=torch.Generator().manual_seed(4))
    from_image = explainer.attribute(images, 2, output="grid")
    patches, _ = batch_patchify(images, (P, P))
    batch, coord, valid = _naflex_batch()
    batch[0, :12] = patches[0]  # sample 0 of the padded batch is this image (3x4 grid)
    from_patches = explainer.attribute(batch, torch.tensor([2, 1]), (coord, valid), output="grid")
    assert from_patches.shape == (2, 1, 3, 4)
    torch.testing.assert_close(from_patches[:1], from_image, rtol=1e-4, atol=1e-6)
    as_input = explainer.attribute(batch, torch.tensor([2, 1]), (coord, valid))
    assert as_input.shape == batch.shape and not as_input[~valid].any()


# --------------------------------------------------------------------------------------------
# The contract: per-sample PatchLayout
# --------------------------------------------------------------------------------------------


def test_patch_layout_per_sample_grids() -> None:
    from captum_legrad import PatchLayout

    # sample 0: 2x3 grid in a 2x3 padded grid; sample 1: 1x2 grid (keys 5, 4), rest -1
    keys = torch.tensor([[0, 1, 2, 3, 4, 5], [5, 4, -1, -1, -1, -1]])
    layout = PatchLayout(keys, (2, 3), torch.tensor([[2, 3], [1, 2]]), torch.tensor([1.0, 2.0]))
    values = torch.arange(12.0).view(2, 6) + 1
    out = layout.gather(values.unsqueeze(0))[0]
    assert out.tolist() == [[[1, 2, 3], [4, 5, 6]], [[24, 22, 0], [0, 0, 0]]]
    padded = PatchLayout.concat([layout, PatchLayout(torch.arange(1, 5), (2, 2))], [2, 1])
    assert padded.grid == (2, 3) and padded.grids is not None
    assert padded.grids.tolist() == [[2, 3], [1, 2], [2, 2]]
    assert padded.keys[2].tolist() == [1, 2, -1, 3, 4, -1]
    with pytest.raises(ValueError, match="hold every per-sample grid"):
        PatchLayout(keys, (2, 3), torch.tensor([[3, 3], [1, 2]]))
    with pytest.raises(ValueError, match="one grid per sample"):
        PatchLayout(torch.arange(6), (2, 3), torch.tensor([[2, 3]]))


def test_siglip2_multi_targets_empty_prompt_batch_equals_single() -> None:
    model = _siglip2("vision_head", seed=1)
    pixels, mask, shapes = _siglip2_batch(seed=8)
    legrad = LeGrad(as_explained(model))
    options: Dict[str, Any] = dict(output="grid", empty_target=5, empty_threshold=0.5)
    batch = legrad.attribute_multi(pixels, [0, 1, 2], (mask, shapes), **options)
    chunked = legrad.attribute_multi(
        pixels, [0, 1, 2], (mask, shapes), internal_batch_size=2, **options
    )
    torch.testing.assert_close(batch, chunked)
    for b, (h, w) in enumerate(SHAPES.tolist()):
        n = h * w
        alone = legrad.attribute_multi(
            pixels[b : b + 1, :n], [0, 1, 2], (mask[b : b + 1, :n], shapes[b : b + 1]), **options
        )
        torch.testing.assert_close(batch[b : b + 1, :, :h, :w], alone, atol=1e-5, rtol=0)
        assert not batch[b, :, h:].any() and not batch[b, :, :, w:].any()
    plain = legrad.attribute_multi(pixels, [0, 1, 2], (mask, shapes), output="grid")
    assert not torch.equal(plain, batch)  # the correction removed something
