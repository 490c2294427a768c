"""LeGrad on the answers of Qwen2-VL, Qwen2.5-VL and Qwen3-VL (dynamic resolution, several
images per sample, video), against the independent oracle in ``tests/oracle_vlm.py``.

Tiny random models (vision depth 1-2, widths 32, two decoder layers, a 64-token vocabulary;
patch 4, merge 2, temporal patch 2), with ``sdpa`` and ``eager`` attention. The sequences
and the token types the oracle reads are built here by hand, as Qwen's processor builds
them; the real processor classes are built offline for ``explain_answer``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

tf = pytest.importorskip("transformers")

from _versions import requires  # noqa: E402
from conftest import assert_not_vacuous  # noqa: E402
from oracle_vlm import answer_logits, oracle_token_maps  # noqa: E402
from test_side_effects import assert_unchanged, snapshot  # noqa: E402

from captum_legrad import AnswerLogits, LeGrad, UnsupportedModelError, explain_answer  # noqa: E402
from captum_legrad.views import SampleViews, Source, View, source_maps  # noqa: E402

pytestmark = requires("transformers", "Qwen3VLForConditionalGeneration", since="transformers 4.57")

START, END, IMAGE, VIDEO = 58, 59, 60, 61
PATCH, MERGE, TEMPORAL = 4, 2, 2
WIDTH = 3 * TEMPORAL * PATCH * PATCH  # one flattened patch: C · temporal · patch²
TOL = 2e-5
TOKENS = dict(
    image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START,
    vision_end_token_id=END,
)  # fmt: skip
ROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}


def _text(**extra: Any) -> Dict[str, Any]:
    return dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rope_parameters=dict(ROPE), **extra,
    )  # fmt: skip


def _qwen2(attn: str, seed: int = 0, layers: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    vision = dict(
        depth=1, embed_dim=32, hidden_size=32, num_heads=2, patch_size=PATCH,
        spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL,
    )  # fmt: skip
    text = _text()
    text["num_hidden_layers"] = layers
    config = tf.Qwen2VLConfig(vision_config=vision, text_config=text, **TOKENS)
    config._attn_implementation = attn
    return tf.Qwen2VLForConditionalGeneration(config).eval()


def _qwen25(attn: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    vision = dict(
        depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=32, num_heads=2,
        patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL,
        window_size=16, fullatt_block_indexes=[1],
    )  # fmt: skip
    config = tf.Qwen2_5_VLConfig(vision_config=vision, text_config=_text(), **TOKENS)
    config._attn_implementation = attn
    return tf.Qwen2_5_VLForConditionalGeneration(config).eval()


def _qwen3(attn: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    vision = dict(
        depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=32, num_heads=2,
        patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL,
        num_position_embeddings=64, deepstack_visual_indexes=[0],
    )  # fmt: skip
    text = _text(head_dim=8)
    text["rope_parameters"]["mrope_interleaved"] = True
    config = tf.Qwen3VLConfig(vision_config=vision, text_config=text, **TOKENS)
    config._attn_implementation = attn
    return tf.Qwen3VLForConditionalGeneration(config).eval()


MODELS: Dict[str, Callable[..., nn.Module]] = {
    "qwen2": _qwen2,
    "qwen2.5": _qwen25,
    "qwen3": _qwen3,
}
ATTN = ("sdpa", "eager")
_cache: Dict[Tuple[str, str], nn.Module] = {}


def model_for(name: str, attn: str) -> nn.Module:
    if (name, attn) not in _cache:
        _cache[(name, attn)] = MODELS[name](attn)
    return _cache[(name, attn)]


# ---------------------------------------------------------------------- building inputs


def tokens(thw: Tuple[int, int, int]) -> int:
    t, h, w = thw
    return t * h * w // (MERGE * MERGE)


def prompt(
    visuals: List[Tuple[str, Tuple[int, int, int]]],
    before: Tuple[int, ...] = (1, 2),
    frames_apart: bool = False,
) -> Tensor:
    """``before``, then each image / video wrapped in its start and end tokens, then text.
    ``frames_apart``: each temporal group of a video on its own after a timestamp token, as
    Qwen3-VL's processor writes videos."""
    ids = list(before)
    for kind, (t, h, w) in visuals:
        if kind == "video" and frames_apart:
            for _ in range(t):
                ids += [9, START, *[VIDEO] * tokens((1, h, w)), END]
            ids += [5]
            continue
        ids += [START, *[IMAGE if kind == "image" else VIDEO] * tokens((t, h, w)), END, 5]
    return torch.tensor([*ids, 6, 7])


def pad(prompts: List[Tensor], side: str) -> Tuple[Tensor, Tensor]:
    s = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), s), 3, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        where = slice(s - len(p), s) if side == "left" else slice(0, len(p))
        ids[i, where] = p
        mask[i, where] = 1
    return ids, mask


def types(ids: Tensor) -> Tensor:
    """``mm_token_type_ids`` as the processor returns them: 1 image, 2 video, 0 text."""
    return (ids == IMAGE).long() + 2 * (ids == VIDEO).long()


def patches(grids: List[Tuple[int, int, int]], seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, WIDTH, generator=gen)


def oracle_batch(
    prompts: List[Tensor], answers: Tensor, extra: Dict[str, Any]
) -> Tuple[Dict[str, Any], Tensor, List[Tensor]]:
    """The whole left-padded teacher-forced batch for the model, built by hand."""
    b, t = answers.shape
    ids, mask = pad(prompts, "left")
    s = ids.shape[1]
    full = torch.cat([ids, answers], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(answers)], dim=1)
    batch = {"input_ids": full, "attention_mask": full_mask, **extra}
    batch["mm_token_type_ids"] = types(full) * full_mask
    positions = torch.arange(s - 1, s + t - 1).expand(b, t)
    keys = [
        torch.nonzero(((row == IMAGE) | (row == VIDEO)) & (m == 1))[:, 0]
        for row, m in zip(ids, mask)
    ]
    return batch, positions, keys


def answers_for(b: int, seed: int, t: int = 3) -> Tensor:
    return torch.randint(8, 56, (b, t), generator=torch.Generator().manual_seed(seed))


A, B = (1, 4, 6), (1, 6, 4)  # images of 16x24 and 24x16 pixels: 2x3 and 3x2 token grids


# ---------------------------------------------------------------------------- the oracle


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_answer_logits_are_the_models_logits(name: str, attn: str) -> None:
    model = model_for(name, attn)
    prompts = [prompt([("image", A)]), prompt([("image", B)], before=(1,))]
    answers = answers_for(2, 0)
    pixels = patches([A, B], 0)
    grid_thw = torch.tensor([A, B])
    batch, positions, _ = oracle_batch(
        prompts, answers, {"pixel_values": pixels, "image_grid_thw": grid_thw}
    )
    expected = answer_logits(model, batch, positions, answers)
    for side in ("left", "right"):
        ids, mask = pad(prompts, side)
        got = AnswerLogits(
            model, ids, answers, mask, image_grid_thw=grid_thw, mm_token_type_ids=types(ids) * mask
        )(pixels)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # mm_token_type_ids built from input_ids when not given
    ids, mask = pad(prompts, "left")
    built = AnswerLogits(model, ids, answers, mask, image_grid_thw=grid_thw)(pixels)
    torch.testing.assert_close(built, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_maps_match_oracle(name: str, attn: str) -> None:
    """Two samples, images of different shapes, left padding: raw grids and maps."""
    model = model_for(name, attn)
    prompts = [prompt([("image", A)]), prompt([("image", B)], before=(1,))]
    answers = answers_for(2, 1)
    pixels = patches([A, B], 1)
    grid_thw = torch.tensor([A, B])
    batch, positions, keys = oracle_batch(
        prompts, answers, {"pixel_values": pixels, "image_grid_thw": grid_thw}
    )
    expected = oracle_token_maps(model, batch, positions, answers, keys)  # [(T, L, 6)]
    for e in expected:
        assert_not_vacuous(e.permute(1, 0, 2).unsqueeze(0), lead=3)
    ids, mask = pad(prompts, "left")
    explained = AnswerLogits(model, ids, answers, mask, image_grid_thw=grid_thw)
    legrad = LeGrad(explained)
    raw = legrad.attribute_multi(pixels, targets=range(3), output="grid", normalize=False)
    assert raw.shape == (2, 3, 3, 3)  # padded to the batch's largest grid
    scale = max(e.abs().max() for e in expected)
    for b, (g_h, g_w) in enumerate([(2, 3), (3, 2)]):
        want = expected[b].sum(1).view(3, g_h, g_w)
        torch.testing.assert_close(raw[b, :, :g_h, :g_w], want, rtol=1e-4, atol=TOL * scale)
        assert not raw[b, :, g_h:].any() and not raw[b, :, :, g_w:].any()
    maps = legrad.attribute_multi(pixels, targets=range(3))
    assert maps.shape == (2, 3, 24, 24)
    for b, (g_h, g_w) in enumerate([(2, 3), (3, 2)]):
        own = expected[b].sum(1).view(1, 3, g_h, g_w)
        up = F.interpolate(own, size=(g_h * 8, g_w * 8), mode="bilinear", align_corners=False)[0]
        low = up.flatten(1).min(1).values.view(3, 1, 1)
        high = up.flatten(1).max(1).values.view(3, 1, 1)
        torch.testing.assert_close(
            maps[b, :, : g_h * 8, : g_w * 8], (up - low) / (high - low), rtol=1e-4, atol=1e-4
        )
    per_layer = legrad.attribute_layers(pixels, target=1)
    assert per_layer.shape == (2, 2, 3, 3)
    torch.testing.assert_close(
        per_layer[0, :, :2, :3], expected[0][1].view(2, 2, 3), rtol=1e-4, atol=TOL * scale
    )


@pytest.mark.parametrize("name", sorted(MODELS))
def test_sdpa_equals_eager(name: str) -> None:
    prompts = [prompt([("image", A)])]
    ids, mask = pad(prompts, "left")
    answers = answers_for(1, 2)
    pixels = patches([A], 2)
    maps = [
        LeGrad(
            AnswerLogits(
                model_for(name, attn), ids, answers, mask, image_grid_thw=torch.tensor([A])
            )
        ).attribute_multi(pixels, targets=range(3), output="grid", normalize=False)
        for attn in ATTN
    ]
    assert maps[0].abs().max() > 0
    torch.testing.assert_close(maps[0], maps[1], rtol=1e-4, atol=1e-6 * maps[0].abs().max())


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_batch_equals_single(name: str, side: str) -> None:
    model = model_for(name, "sdpa")
    small = (1, 4, 4)
    prompts = [prompt([("image", A)]), prompt([("image", small)], before=(1, 2, 3, 4))]
    answers = answers_for(2, 3)
    pixels = patches([A, small], 3)
    ids, mask = pad(prompts, side)
    batched = LeGrad(
        AnswerLogits(model, ids, answers, mask, image_grid_thw=torch.tensor([A, small]))
    ).attribute_multi(pixels, targets=range(3))
    split = A[0] * A[1] * A[2]
    for i, (p, thw, rows) in enumerate(
        zip(prompts, [A, small], [slice(0, split), slice(split, None)])
    ):
        alone = LeGrad(
            AnswerLogits(model, p, answers[i], image_grid_thw=torch.tensor([thw]))
        ).attribute_multi(pixels[rows], targets=range(3))
        h, w = thw[1] * PATCH, thw[2] * PATCH
        torch.testing.assert_close(batched[i : i + 1, :, :h, :w], alone, rtol=1e-4, atol=1e-4)
        assert not batched[i, :, h:].any() and not batched[i, :, :, w:].any()


# ---------------------------------------------------------------- several images, video


@pytest.mark.parametrize("name", sorted(MODELS))
def test_two_images_per_sample(name: str) -> None:
    model = model_for(name, "eager")
    small = (1, 4, 4)
    prompts = [
        prompt([("image", A), ("image", small)]),
        prompt([("image", B), ("image", A)], before=(1,)),
    ]
    answers = answers_for(2, 4)
    grids = [A, small, B, A]
    pixels = patches(grids, 4)
    grid_thw = torch.tensor(grids)
    batch, positions, keys = oracle_batch(
        prompts, answers, {"pixel_values": pixels, "image_grid_thw": grid_thw}
    )
    expected = oracle_token_maps(model, batch, positions, answers, keys)
    ids, mask = pad(prompts, "right")
    explained = AnswerLogits(model, ids, answers, mask, image_grid_thw=grid_thw)
    views = explained.view_maps(pixels)
    assert [[tuple(v.shape) for v in s] for s in views] == [
        [(3, 2, 3), (3, 2, 2)],
        [(3, 3, 2), (3, 2, 3)],
    ]
    scale = max(e.abs().max() for e in expected)
    for b in range(2):
        assert_not_vacuous(expected[b].permute(1, 0, 2).unsqueeze(0), lead=3)
        got = torch.cat([v.flatten(1) for v in views[b]], dim=1)
        torch.testing.assert_close(got, expected[b].sum(1), rtol=1e-4, atol=TOL * scale)
    per_image = explained.source_maps(pixels)
    assert [[tuple(m.shape) for m in s] for s in per_image] == [
        [(3, 16, 24), (3, 16, 16)],
        [(3, 24, 16), (3, 16, 24)],
    ]
    for s in per_image:  # normalised over both images of the sample together
        both = torch.cat([m.flatten(1) for m in s], dim=1)
        assert torch.allclose(both.max(1).values, torch.ones(3))
        assert torch.allclose(both.min(1).values, torch.zeros(3))
    with pytest.raises(ValueError, match="source_maps"):
        LeGrad(explained).attribute_multi(pixels, targets=range(3))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_video(name: str) -> None:
    model = model_for(name, "sdpa")
    thw = (2, 4, 4)  # 4 frames of 16x16: a (2, 2, 2) token grid
    prompts = [prompt([("video", thw)], frames_apart=name == "qwen3")]
    answers = answers_for(1, 5)
    pixels = patches([thw], 5)
    grid = torch.tensor([thw])
    extra: Dict[str, Any] = {"pixel_values_videos": pixels, "video_grid_thw": grid}
    if name == "qwen2.5":
        extra["second_per_grid_ts"] = torch.tensor([1.0])
    batch, positions, keys = oracle_batch(prompts, answers, extra)
    expected = oracle_token_maps(model, batch, positions, answers, keys)[0]
    assert_not_vacuous(expected.permute(1, 0, 2).unsqueeze(0), lead=3)
    ids, mask = pad(prompts, "left")
    others = {k: v for k, v in extra.items() if k != "pixel_values_videos"}
    explained = AnswerLogits(model, ids, answers, mask, **others)
    legrad = LeGrad(explained)
    raw = legrad.attribute_multi(pixels, targets=range(3), output="grid", normalize=False)
    assert raw.shape == (1, 3, 2, 2, 2)
    torch.testing.assert_close(
        raw[0], expected.sum(1).view(3, 2, 2, 2), rtol=1e-4, atol=TOL * expected.abs().max()
    )
    maps = legrad.attribute_multi(pixels, targets=range(3))
    assert maps.shape == (1, 3, 4, 16, 16)  # frames, height, width
    up = F.interpolate(
        expected.sum(1).view(1, 3, 2, 2, 2), size=(4, 16, 16), mode="trilinear",
        align_corners=False,
    )[0]  # fmt: skip
    low = up.flatten(1).min(1).values.view(3, 1, 1, 1)
    high = up.flatten(1).max(1).values.view(3, 1, 1, 1)
    torch.testing.assert_close(maps[0], (up - low) / (high - low), rtol=1e-4, atol=1e-4)


def test_image_and_video_in_one_prompt() -> None:
    model = model_for("qwen2", "sdpa")
    video = (2, 4, 4)
    prompts = [prompt([("image", A), ("video", video)])]
    answers = answers_for(1, 6)
    images, videos = patches([A], 6), patches([video], 7)
    extra = {
        "pixel_values": images, "image_grid_thw": torch.tensor([A]),
        "pixel_values_videos": videos, "video_grid_thw": torch.tensor([video]),
    }  # fmt: skip
    batch, positions, keys = oracle_batch(prompts, answers, extra)
    expected = oracle_token_maps(model, batch, positions, answers, keys)[0]
    ids, mask = pad(prompts, "left")
    explained = AnswerLogits(
        model, ids, answers, mask, image_grid_thw=torch.tensor([A]),
        video_grid_thw=torch.tensor([video]), pixel_values_videos=videos,
    )  # fmt: skip
    views = explained.view_maps(images)[0]
    assert [tuple(v.shape) for v in views] == [(3, 2, 3), (3, 2, 2, 2)]
    got = torch.cat([v.flatten(1) for v in views], dim=1)
    torch.testing.assert_close(got, expected.sum(1), rtol=1e-4, atol=TOL * expected.abs().max())
    canvases = explained.source_maps(images)[0]
    assert [tuple(c.shape) for c in canvases] == [(3, 16, 24), (3, 4, 16, 16)]


# ------------------------------------------------------------------- forms and side effects


def test_input_form_is_the_patches_shape() -> None:
    """``output="input"``: each flattened patch row holds the map at that patch's pixels,
    repeated over channels and the temporal patch (the processor's order, written here)."""
    model = model_for("qwen2", "sdpa")
    prompts = [prompt([("image", A)])]
    answers = answers_for(1, 8)
    pixels = patches([A], 8)
    legrad = LeGrad(AnswerLogits(model, prompts[0], answers, image_grid_thw=torch.tensor([A])))
    rows = legrad.attribute(pixels, target=1)
    assert rows.shape == pixels.shape
    image = legrad.attribute(pixels, target=1, output="map")[0, 0]  # (16, 24)
    _, h, w = A
    index = 0
    for bh in range(h // MERGE):
        for bw in range(w // MERGE):
            for mh in range(MERGE):
                for mw in range(MERGE):
                    y, x = (bh * MERGE + mh) * PATCH, (bw * MERGE + mw) * PATCH
                    cell = image[y : y + PATCH, x : x + PATCH].flatten()
                    want = cell.repeat(3 * TEMPORAL)  # (C, temporal, py, px)
                    torch.testing.assert_close(rows[index], want)
                    index += 1
    multi = legrad.attribute_multi(pixels, targets=[0, 1], output="input")
    assert multi.shape == (pixels.shape[0], 2, WIDTH)
    torch.testing.assert_close(multi[:, 1], rows)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_unchanged(name: str, attn: str) -> None:
    model = model_for(name, attn)
    prompts = [prompt([("image", A)])]
    answers = answers_for(1, 9)
    pixels = patches([A], 9)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = snapshot(model)
    deltas = model.model.rope_deltas
    LeGrad(
        AnswerLogits(model, prompts[0], answers, image_grid_thw=torch.tensor([A]))
    ).attribute_multi(pixels, targets=range(3))
    assert_unchanged(before, snapshot(model))
    assert model.model.rope_deltas is deltas
    after = model.state_dict()
    for key, value in state.items():
        assert torch.equal(value, after[key]) and value.dtype == after[key].dtype, key
    assert model.config._attn_implementation == attn


def test_bad_arguments() -> None:
    model = model_for("qwen2", "sdpa")
    ids = prompt([("image", A)])
    answers = answers_for(1, 10)
    with pytest.raises(ValueError, match="image_grid_thw"):
        AnswerLogits(model, ids, answers)
    with pytest.raises(ValueError, match="the input LeGrad explains"):
        AnswerLogits(
            model, ids, answers, image_grid_thw=torch.tensor([A]), pixel_values=patches([A], 0)
        )
    with pytest.raises(ValueError, match="grid"):
        AnswerLogits(model, ids, answers, image_grid_thw=torch.tensor([(*B[:2], 8)]))(
            patches([(1, 6, 8)], 0)
        )
    with pytest.raises(ValueError, match="rows"):
        AnswerLogits(model, ids, answers, image_grid_thw=torch.tensor([A, A]))(patches([A, A], 0))
    with pytest.raises(ValueError, match="must match"):
        AnswerLogits(
            model, ids, answers, image_grid_thw=torch.tensor([A]), mm_token_type_ids=torch.zeros(3)
        )


def test_chunked_backward_and_noise_tunnel() -> None:
    """The patches are never split; internal_batch_size bounds the backward only; NoiseTunnel,
    which repeats dimension 0, is refused with the reason."""
    from captum.attr import NoiseTunnel

    model = model_for("qwen2", "sdpa")
    prompts = [prompt([("image", A)]), prompt([("image", B)])]
    ids, mask = pad(prompts, "left")
    answers = answers_for(2, 14)
    pixels = patches([A, B], 14)
    explained = AnswerLogits(model, ids, answers, mask, image_grid_thw=torch.tensor([A, B]))
    legrad = LeGrad(explained)
    whole = legrad.attribute_multi(pixels, targets=range(3), output="grid", normalize=False)
    chunked = legrad.attribute_multi(
        pixels, targets=range(3), output="grid", normalize=False, internal_batch_size=1
    )
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="NoiseTunnel"):  # it repeats dim 0: patch rows
        NoiseTunnel(legrad).attribute(pixels, nt_samples=2, stdevs=0.0, target=1)


def test_spec_hooks_are_validated() -> None:
    from captum_legrad.spec import MapForms

    explained = AnswerLogits(
        model_for("qwen2", "sdpa"), prompt([("image", A)]), answers_for(1, 15),
        image_grid_thw=torch.tensor([A]),
    )  # fmt: skip
    spec = explained.legrad_spec()
    assert spec.samples is not None and isinstance(spec.map_forms, MapForms)
    assert spec.batch_size((patches([A], 0),)) == 1
    fields = {k: getattr(spec, k) for k in spec.__dataclass_fields__}
    with pytest.raises(ValueError, match="map_forms"):
        type(spec)(**{**fields, "map_forms": None})  # samples without map_forms
    with pytest.raises(ValueError, match="layout"):
        type(spec)(**{**fields, "layout": None})
    plain = type(spec)(**{**fields, "samples": None, "map_forms": None})
    assert plain.batch_size((torch.zeros(4, 3, 8, 8),)) == 4


def test_qwen3_moe_matches_oracle() -> None:
    """Qwen3-VL-MoE: the same decoder with sparse expert MLPs (routed per token, so one
    backward still serves every answer token)."""
    torch.manual_seed(0)
    vision = dict(
        depth=1, hidden_size=32, intermediate_size=64, out_hidden_size=32, num_heads=2,
        patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL,
        num_position_embeddings=64, deepstack_visual_indexes=[0],
    )  # fmt: skip
    text = _text(head_dim=8, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2)
    text["rope_parameters"]["mrope_interleaved"] = True
    config = tf.Qwen3VLMoeConfig(vision_config=vision, text_config=text, **TOKENS)
    model = tf.Qwen3VLMoeForConditionalGeneration(config).eval()
    with torch.no_grad():  # HF zero-initialises the experts' weights here: randomise them
        for name, parameter in model.named_parameters():
            if "experts" in name and not parameter.any():
                parameter.normal_(0, 0.02)
    prompts = [prompt([("image", A)]), prompt([("image", B)], before=(1,))]
    answers = answers_for(2, 16)
    pixels = patches([A, B], 16)
    grid_thw = torch.tensor([A, B])
    batch, positions, keys = oracle_batch(
        prompts, answers, {"pixel_values": pixels, "image_grid_thw": grid_thw}
    )
    expected = oracle_token_maps(model, batch, positions, answers, keys)
    ids, mask = pad(prompts, "right")
    views = AnswerLogits(model, ids, answers, mask, image_grid_thw=grid_thw).view_maps(pixels)
    scale = max(e.abs().max() for e in expected)
    for b in range(2):
        assert_not_vacuous(expected[b].permute(1, 0, 2).unsqueeze(0), lead=3)
        got = views[b][0].flatten(1)
        torch.testing.assert_close(got, expected[b].sum(1), rtol=1e-4, atol=TOL * scale)


def test_qwen3_5_is_refused() -> None:
    hybrid = type("Qwen3_5ForConditionalGeneration", (nn.Module,), {})()
    with pytest.raises(UnsupportedModelError, match="linear-attention"):
        AnswerLogits(hybrid, torch.tensor([1]), torch.tensor([2]))


# ------------------------------------------------------------------------------ views


def test_overlapping_views_are_averaged() -> None:
    """Two views of one 8x8 image: the left 8x6 and the right 8x6; the overlap (columns
    2..5) holds the mean of both upsampled maps, the rest each view's own."""
    sample = SampleViews(
        (Source("image", (8, 8)),),
        (
            View(torch.arange(4), (2, 2), 0, (0, 0, 8, 6), name="left"),
            View(torch.arange(4, 8), (2, 2), 0, (0, 2, 8, 8), name="right"),
        ),
    )
    left = torch.tensor([[[1.0, 1.0], [1.0, 1.0]]])
    right = torch.tensor([[[3.0, 3.0], [3.0, 3.0]]])
    ((canvas, valid),) = source_maps([left, right], sample)
    assert valid.all()
    assert torch.equal(canvas[0, :, :2], torch.full((8, 2), 1.0))
    assert torch.equal(canvas[0, :, 2:6], torch.full((8, 4), 2.0))
    assert torch.equal(canvas[0, :, 6:], torch.full((8, 2), 3.0))
    with pytest.raises(ValueError, match="outside"):
        SampleViews((Source("image", (8, 8)),), (View(torch.arange(4), (2, 2), 0, (8, 0, 9, 8)),))
    # A view reaching beyond the canvas (a padded copy) is upsampled whole and cut to it:
    # rows -4..12 of a 2-row grid [1, 3], kept rows 0..8 (the middle half).
    beyond = SampleViews(
        (Source("image", (8, 8)),), (View(torch.arange(2), (2, 1), 0, (-4, 0, 12, 8)),)
    )
    ((canvas, valid),) = source_maps([torch.tensor([[[1.0], [3.0]]])], beyond)
    column = F.interpolate(torch.tensor([[[[1.0], [3.0]]]]), size=(16, 8), mode="bilinear")
    assert valid.all()
    torch.testing.assert_close(canvas[0], column[0, 0, 4:12])


# ------------------------------------------------------------------- the real processor


def _processor() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    words = ["<pad>", "<eos>", *[f"w{i}" for i in range(56)], *specials]
    inner = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = tf.PreTrainedTokenizerFast(
        tokenizer_object=inner, pad_token="<pad>", eos_token="<eos>"
    )
    tokenizer.add_tokens(specials, special_tokens=True)
    images = tf.Qwen2VLImageProcessor(
        min_pixels=8 * 8, max_pixels=32 * 32, patch_size=PATCH, merge_size=MERGE,
        temporal_patch_size=TEMPORAL, image_mean=[0.0] * 3, image_std=[1.0] * 3,
    )  # fmt: skip
    videos = tf.Qwen2VLVideoProcessor(
        min_pixels=8 * 8, max_pixels=32 * 32, patch_size=PATCH, merge_size=MERGE,
        temporal_patch_size=TEMPORAL, image_mean=[0.0] * 3, image_std=[1.0] * 3,
    )  # fmt: skip
    return tf.Qwen2VLProcessor(image_processor=images, tokenizer=tokenizer, video_processor=videos)


PROMPT = "w1 <|vision_start|><|image_pad|><|vision_end|> w3"


def test_explain_answer_with_the_processor() -> None:
    model = model_for("qwen2", "sdpa")
    processor = _processor()
    image = torch.rand(3, 20, 36, generator=torch.Generator().manual_seed(11))
    result = explain_answer(model, processor, image, PROMPT, max_new_tokens=3)
    inputs = processor(images=[image], text=[PROMPT], return_tensors="pt")
    assert tuple(inputs["image_grid_thw"][0].tolist()) == (1, 4, 8)  # resized to 16x32
    ids = inputs["input_ids"]
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)[0, ids.shape[1] :]
    expected = generated.tolist()
    special = set(processor.tokenizer.all_special_ids)
    while expected and expected[-1] in special:
        expected.pop()
    assert result.answer_ids.tolist() == expected
    assert result.maps.shape == (len(expected), 20, 36)  # the original image's size
    assert result.pixel_values.shape == (1, 3, 20, 36)
    explained = AnswerLogits(
        model, ids, torch.tensor(expected), inputs["attention_mask"],
        image_grid_thw=inputs["image_grid_thw"], mm_token_type_ids=inputs["mm_token_type_ids"],
    )  # fmt: skip
    canvas = explained.source_maps(inputs["pixel_values"])[0][0]  # (T, 16, 32)
    up = F.interpolate(canvas[None], size=(20, 36), mode="bilinear", align_corners=False)[0]
    low = up.flatten(1).min(1).values.view(-1, 1, 1)
    high = up.flatten(1).max(1).values.view(-1, 1, 1)
    torch.testing.assert_close(result.maps, (up - low) / (high - low), rtol=1e-4, atol=1e-4)


def test_explain_answer_on_a_video() -> None:
    model = model_for("qwen2", "sdpa")
    processor = _processor()
    video = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(12))
    text = "w1 <|vision_start|><|video_pad|><|vision_end|> w3"
    result = explain_answer(model, processor, video, text, answer="w7 w8")
    assert result.tokens == ["w7", "w8"]
    assert result.maps.shape == (2, 4, 16, 16) and result.answer_map.shape == (4, 16, 16)


def _half_model() -> nn.Module:
    """A Qwen2-VL whose image tokens are zero where the image is black: the vision blocks
    and every bias are off, so a patch's token is a function of its pixels alone and
    black patches give zero tokens; with one decoder layer and no value bias their values
    are zero, so no answer logit can depend on their attention weights."""
    model = _qwen2("sdpa", seed=13, layers=1)
    with torch.no_grad():
        for name, parameter in model.model.visual.named_parameters():
            if name.endswith("bias") or ".attn.proj." in name or ".mlp.fc2." in name:
                parameter.zero_()
        for layer in model.model.language_model.layers:
            layer.self_attn.v_proj.bias.zero_()
    return model


@pytest.mark.parametrize("bright", ["left", "right"])
def test_a_half_image_maps_to_that_half(bright: str) -> None:
    """The issue's mapping test: an image whose one half is coloured and the other black
    (zero after the processor, whose mean is 0 and std 1 here) gives a map on the coloured
    half, in the original image's coordinates (30x50 pixels, resized to 16x32 for the
    model)."""
    model = _half_model()
    processor = _processor()
    image = torch.zeros(3, 30, 50)
    half = slice(0, 25) if bright == "left" else slice(25, 50)
    image[:, :, half] = torch.tensor([0.9, 0.4, 0.1]).view(3, 1, 1)
    result = explain_answer(model, processor, image, PROMPT, answer="w7 w8 w9")
    maps = result.maps
    assert maps.shape == (3, 30, 50)
    lit, dark = (
        (maps[..., :25], maps[..., 25:]) if bright == "left" else (maps[..., 25:], maps[..., :25])
    )
    assert torch.all(lit.amax(dim=(1, 2)) == 1.0)
    # A token covers 12.5 original pixels; farther than one token from the boundary the
    # bilinear upsampling reaches only dark tokens: exactly zero.
    far = dark[..., 13:] if bright == "left" else dark[..., :-13]
    assert torch.all(far == 0)
    assert torch.all(lit.mean(dim=(1, 2)) > 3 * dark.mean(dim=(1, 2)))
