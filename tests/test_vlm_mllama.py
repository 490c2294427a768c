"""Mllama (Llama 3.2 Vision): answer maps through the cross-attention layers.

Tiny random-init models (three text layers, the last two cross-attention layers; a two-layer
vision encoder with one global layer; 28-pixel tiles of 7-pixel patches, up to 4 tiles)
and the real ``MllamaProcessor`` / ``MllamaImageProcessor`` with a tiny offline word-level
tokenizer. The maps are compared with the independent oracle of
``tests/oracle_vlm_mllama.py`` (docs/method.md, "Cross-attention VLMs"). HF zero-inits
the cross-attention gates (``tanh(0) = 0``: every map would be zero), so the models here
set them nonzero.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest
import torch
from torch import Tensor, nn

tf = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from _versions import requires  # noqa: E402
from conftest import assert_not_vacuous  # noqa: E402
from oracle_vlm_mllama import canvas_grid, fit_to_canvas, key_maps  # noqa: E402
from test_side_effects import assert_unchanged, snapshot  # noqa: E402
from test_vlm_tiles import half_image, random_image  # noqa: E402

from captum_legrad import AnswerLogits, LeGrad, UnsupportedModelError, explain_answer  # noqa: E402
from captum_legrad.adapters.hf import vlm_mllama  # noqa: E402

pytestmark = requires("transformers", "MllamaForConditionalGeneration", since="transformers 4.45")

WORDS = ["<unk>", "<pad>", "<|begin_of_text|>", "<|image|>", "<eos>", "a", "b", "c"]
WORDS += ["what", "is", "this", "?"]
VOCAB = 16
IMAGE = WORDS.index("<|image|>")
TILE, PATCH, TILES = 28, 7, 4
SIDE = TILE // PATCH
TOL = 2e-5


def tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers

    inner = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = tf.PreTrainedTokenizerFast(
        tokenizer_object=inner, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>",
        bos_token="<|begin_of_text|>",
    )  # fmt: skip
    fast.add_special_tokens({"additional_special_tokens": ["<|image|>"]})
    fast.padding_side = "left"
    return fast


def processor() -> Any:
    """The real Mllama processor, offline; mean 0 and std 1 so black pixels (and the
    canvas padding) are exactly 0."""
    images = tf.MllamaImageProcessor(
        size={"height": TILE, "width": TILE}, max_image_tiles=TILES,
        image_mean=[0.0] * 3, image_std=[1.0] * 3, do_rescale=False,
    )  # fmt: skip
    return tf.MllamaProcessor(image_processor=images, tokenizer=tokenizer())


def build(attn: str = "sdpa", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    vision = tf.MllamaVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_global_layers=1,
        attention_heads=2, image_size=TILE, patch_size=PATCH, max_num_tiles=TILES,
        vision_output_dim=48, intermediate_layers_indices=[0, 1],
    )  # fmt: skip
    text = tf.MllamaTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, cross_attention_layers=[1, 2], pad_token_id=1,
        bos_token_id=2, eos_token_id=4,
    )  # fmt: skip
    config = tf.MllamaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE)
    config._attn_implementation = attn
    model: Any = tf.MllamaForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn)
    with torch.no_grad():  # HF zero-inits the gates: tanh(0) = 0 would make every map zero
        for layer in cross_layers(model):
            layer.cross_attn_attn_gate.fill_(1.2)
            layer.cross_attn_mlp_gate.fill_(0.8)
    return model


def cross_layers(model: Any) -> List[nn.Module]:
    text = model.model.language_model
    return [text.layers[i] for i in model.config.text_config.cross_attention_layers]


_models: Dict[str, nn.Module] = {}


def model_for(attn: str) -> nn.Module:
    if attn not in _models:
        _models[attn] = build(attn)
    return _models[attn]


def inputs(images: List[List[Tensor]], texts: List[str], side: str = "left") -> Dict[str, Tensor]:
    proc = processor()
    proc.tokenizer.padding_side = side
    out = proc(images=images, text=texts, return_tensors="pt", padding=True)
    return {k: v for k, v in out.items() if isinstance(v, Tensor)}


SIZES = [(40, 70), (90, 40), (20, 20)]  # canvases 2x2, 3x1 and 1x1 tiles
TEXTS = ["<|image|> <|image|> what is this ?", "a <|image|> b"]


def case(seed: int = 0, side: str = "left") -> Tuple[Dict[str, Tensor], Tensor, Tensor]:
    """Two prompts of different lengths: the first with two images (2x2 and 3x1 tiles), the
    second with one (1x1) after a text token (a row that sees no image); answers; sizes."""
    images = [[random_image(*SIZES[0], seed), random_image(*SIZES[1], seed + 1)]]
    images.append([random_image(*SIZES[2], seed + 2)])
    batch = inputs(images, TEXTS, side)
    answers = torch.randint(5, 12, (2, 3), generator=torch.Generator().manual_seed(seed))
    return batch, answers, torch.tensor(SIZES)


def explained_for(
    model: nn.Module, batch: Dict[str, Tensor], answers: Tensor, sizes: Tensor
) -> Any:
    others = {
        k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "pixel_values")
    }
    return AnswerLogits(
        model, batch["input_ids"], answers, batch["attention_mask"], image_sizes=sizes, **others
    )


def teacher_forced(batch: Dict[str, Tensor], answers: Tensor) -> Tuple[Dict[str, Tensor], Tensor]:
    """The left-padded batch with the answers appended (the cross-attention mask's last row
    repeated over them, as generate does) and the predicting positions ``(B, T)``."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert bool((mask[:, -1] == 1).all()), "the processor must pad on the left here"
    b, s = ids.shape
    t = answers.shape[1]
    full = dict(batch)
    full["input_ids"] = torch.cat([ids, answers], dim=1)
    full["attention_mask"] = torch.cat([mask, torch.ones_like(answers)], dim=1)
    cross = batch["cross_attention_mask"]
    full["cross_attention_mask"] = torch.cat([cross, cross[:, -1:].expand(-1, t, -1, -1)], 1)
    return full, torch.arange(s - 1, s + t - 1).expand(b, t)


# ---------------------------------------------------------------------- the oracle


@pytest.mark.parametrize("route", ["lean", "explicit"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_maps_match_the_oracle(attn: str, route: str) -> None:
    """Logits equal the model's own; every image's canvas grid and tiles (CLS and padding
    tiles left out, several images per sample and a padding image: view_maps) and LeGrad's
    output="grid" through ``route`` equal the oracle's."""
    model = model_for(attn)
    batch, answers, sizes = case()
    full, positions = teacher_forced(batch, answers)
    explained = explained_for(model, batch, answers, sizes)
    pixels = batch["pixel_values"]
    with torch.no_grad():
        own = model(**full, use_cache=False).logits
    rows = torch.arange(2).unsqueeze(1)
    torch.testing.assert_close(
        explained(pixels), own[rows, positions, answers], rtol=1e-4, atol=1e-5
    )
    expected = key_maps(model, full, positions, answers)  # (B, T, L, N_v)
    assert expected.shape[-1] == 2 * TILES * (1 + SIDE * SIDE)
    samples = explained.views(pixels)
    assert [len(s.sources) for s in samples] == [2, 1]
    got = explained.view_maps(pixels, targets=range(3))
    ratio_ids = batch["aspect_ratio_ids"].tolist()
    grids = [(2 * SIDE, 2 * SIDE), (3 * SIDE, SIDE), (SIDE, SIDE)]
    n = 0
    for b, sample in enumerate(samples):
        for i, (view, maps) in enumerate(zip(sample.views, got[b])):
            ref = canvas_grid(expected[b].sum(1), i, ratio_ids[b][i], model.config)
            assert view.grid == ref.shape[-2:] == grids[n]
            n += 1
            assert_not_vacuous(ref.unsqueeze(0), lead=2)
            flat = ref.flatten(1)
            assert bool((flat.max(1).values > flat.min(1).values).all()), "constant oracle map"
            torch.testing.assert_close(maps, ref, rtol=1e-4, atol=TOL * float(ref.abs().max()))
            # per tile: the oracle's own tile t of this image, CLS dropped
            rows_cols = view.grid[0] // SIDE, view.grid[1] // SIDE
            tiles = vlm_mllama.tile_maps(maps, *rows_cols)
            keys = expected[b].sum(1).reshape(3, -1, TILES, 1 + SIDE * SIDE)[:, i, :, 1:]
            for t in range(rows_cols[0] * rows_cols[1]):
                own = keys[:, t].reshape(3, SIDE, SIDE)
                torch.testing.assert_close(
                    tiles[:, t], own, rtol=1e-4, atol=TOL * float(own.abs().max())
                )
    # Per layer: the last cross-attention layer alone, one token.
    last = explained.view_maps(pixels, targets=[1], layers=[-1])
    for b in range(len(samples)):
        for i, maps in enumerate(last[b]):
            ref = canvas_grid(expected[b][1:2, -1], i, ratio_ids[b][i], model.config)
            assert_not_vacuous(ref.unsqueeze(0), lead=2)
            torch.testing.assert_close(maps, ref, rtol=1e-4, atol=TOL * float(ref.abs().max()))
    # LeGrad's own output="grid" on a one-image sample, through the chosen route
    one = inputs([[random_image(*SIZES[0], 5)]], ["a <|image|> what is this ?"])
    full, positions = teacher_forced(one, answers[:1])
    expected = key_maps(model, full, positions, answers[:1])
    explained = explained_for(model, one, answers[:1], sizes[:1])
    grid = LeGrad(explained, route=route).attribute_multi(
        one["pixel_values"], targets=range(3), output="grid", normalize=False
    )
    ref = canvas_grid(expected[0].sum(1), 0, int(one["aspect_ratio_ids"][0, 0]), model.config)
    assert grid.shape == (1, 3, 2 * SIDE, 2 * SIDE)
    assert_not_vacuous(ref.unsqueeze(0), lead=2)
    torch.testing.assert_close(grid[0], ref, rtol=1e-4, atol=TOL * float(ref.abs().max()))


def test_sdpa_equals_eager_batch_equals_single_and_padding_sides() -> None:
    """sdpa ≡ eager, batch ≡ each sample alone, right padding ≡ left padding; the model is
    unchanged by the calls."""
    batch, answers, sizes = case(seed=3)
    model = model_for("sdpa")
    with torch.no_grad():
        model(**teacher_forced(batch, answers)[0], use_cache=False)
    before = snapshot(model)
    together = explained_for(model, batch, answers, sizes).source_maps(batch["pixel_values"])
    assert_unchanged(before, snapshot(model))
    eager = explained_for(model_for("eager"), batch, answers, sizes).source_maps(
        batch["pixel_values"]
    )
    right, _, _ = case(seed=3, side="right")
    assert not bool((right["attention_mask"][:, -1] == 1).all()), "no right padding"
    right_maps = explained_for(model, right, answers, sizes).source_maps(right["pixel_values"])
    assert [m.shape[-2:] for m in together[0]] == [SIZES[0], SIZES[1]]
    images = [[random_image(*SIZES[0], 3), random_image(*SIZES[1], 4)]]
    images.append([random_image(*SIZES[2], 5)])
    for b in range(2):
        alone = inputs([images[b]], [TEXTS[b]])
        own_sizes = sizes[:2] if b == 0 else sizes[2:]
        single = explained_for(model, alone, answers[b : b + 1], own_sizes).source_maps(
            alone["pixel_values"]
        )
        for i, m in enumerate(together[b]):
            torch.testing.assert_close(m, eager[b][i], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(m, right_maps[b][i], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(m, single[0][i], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------- geometry


def white_patches_only(model: Any) -> Any:
    """An Mllama whose vision tokens are exactly zero where the pixels are black (the
    processor's mean 0 / std 1 make them 0) and not where they are white: every vision
    layer made the identity (its output projections and gates zero), positional and tile
    embeddings zero, layer norms without bias, the projector without bias. A zero vision
    token has a zero value, so its LeGrad value ``(∂s/∂O)·V`` is exactly zero."""
    vision = model.model.vision_model
    with torch.no_grad():
        for layer in [*vision.transformer.layers, *vision.global_transformer.layers]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.fc2.weight.zero_()
            layer.mlp.fc2.bias.zero_()
            if getattr(layer, "is_gated", False):
                layer.gate_attn.zero_()
                layer.gate_ffn.zero_()
        for name, param in vision.named_parameters():
            if "positional_embedding" in name or name.endswith(".bias"):
                param.zero_()
        vision.class_embedding.zero_()
        model.model.multi_modal_projector.bias.zero_()
    return model


@pytest.mark.parametrize("size", [(40, 70), (90, 40)])
def test_half_image_map_lies_on_its_half(size: Tuple[int, int]) -> None:
    """White left half, black right half, with the real processor: the canvas grid is zero
    on the black cells and on the padding rows/columns (the content is ``h' × w'`` of the
    processor's fit-to-canvas rule), positive on the white cells; output="map" is on the
    original image: zero on its right half, positive on its left half to the bottom edge
    (the canvas padding cut off before the resize)."""
    model = white_patches_only(build("sdpa", seed=5))
    height, width = size
    batch = inputs([[half_image(height, width)]], ["a <|image|> what is this ?"])
    explained = explained_for(model, batch, torch.tensor([[5, 6, 7]]), torch.tensor([size]))
    pixels = batch["pixel_values"]
    rows, cols = model.config.vision_config.supported_aspect_ratios[
        int(batch["aspect_ratio_ids"][0, 0]) - 1
    ]
    fit = fit_to_canvas(height, width, (rows * TILE, cols * TILE), TILE)
    # The processor's content: white pixels (1) of the left half, the rest 0.
    canvas = torch.zeros(3, rows * TILE, cols * TILE)
    for k in range(rows * cols):
        r, c = divmod(k, cols)
        canvas[:, r * TILE : (r + 1) * TILE, c * TILE : (c + 1) * TILE] = pixels[0, 0, k]
    lit = (canvas[0] > 0.5).nonzero()  # the resize blurs the white/black edge a little
    assert int(lit[:, 0].max()) + 1 == fit[0]  # the content's height: the rule above
    assert abs(int(lit[:, 1].max()) + 1 - fit[1] / 2) <= 1
    assert vlm_mllama.content_size(height, width, (rows * TILE, cols * TILE), TILE) == fit
    (grid,) = explained.view_maps(pixels)[0]
    cells_white = canvas[0].reshape(rows * SIDE, PATCH, cols * SIDE, PATCH).amax(dim=(1, 3)) > 0
    assert bool((grid[:, ~cells_white] == 0).all()), "a black or padding cell is on"
    assert bool((grid.sum(0)[cells_white] > 0).all()), "a white cell is off"
    assert int(cells_white.any(1).sum()) < rows * SIDE or rows == 1  # padding rows exist
    (placed,) = explained.source_maps(pixels, normalize=False)[0]
    assert placed.shape == (3, height, width)
    cell = width / (cols * SIDE) * cols * TILE / fit[1]  # one cell in original pixels
    right_of = int(width / 2 + 1.5 * cell) + 1
    left_of = int(width / 2 - 1.5 * cell)
    assert bool((placed[..., right_of:] == 0).all())
    assert bool((placed.sum(0)[:, :left_of] > 0).all()), "the left half is off somewhere"
    legrad = LeGrad(explained)
    mapped = legrad.attribute_multi(pixels, targets=range(3), output="map")
    assert mapped.shape == (1, 3, height, width)
    assert bool((mapped[..., right_of:] == 0).all())
    # output="input": pixel_values' shape, zero on the black and padding pixels of every tile
    form = legrad.attribute(pixels, target=0)
    assert form.shape == pixels.shape
    for k in range(rows * cols):
        black = pixels[0, 0, k, 0] == 0
        r, c = divmod(k, cols)
        far = torch.zeros_like(black)  # black pixels more than 1.5 cells from the white
        x = torch.arange(TILE) + c * TILE
        y = torch.arange(TILE) + r * TILE
        edge = fit[1] / 2
        far[:, x > edge + 1.5 * PATCH] = True
        far[y >= fit[0] + 1.5 * PATCH, :] = True
        assert bool((form[0, 0, k][:, far & black] == 0).all())
    assert bool((form[0, 0, rows * cols :] == 0).all())  # the padding tiles


def test_refusals() -> None:
    """Without image_sizes, and output="grid" for a sample of two images: clear errors."""
    batch, answers, sizes = case(seed=1)
    model = model_for("sdpa")
    others = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    others.pop("pixel_values")
    with pytest.raises(ValueError, match="image_sizes"):
        AnswerLogits(model, batch["input_ids"], answers, batch["attention_mask"], **others)(
            batch["pixel_values"]
        )
    others.pop("cross_attention_mask")
    with pytest.raises(ValueError, match="cross_attention_mask"):
        AnswerLogits(
            model, batch["input_ids"], answers, batch["attention_mask"], image_sizes=sizes,
            **others,
        )(batch["pixel_values"])  # fmt: skip
    explained = explained_for(model, batch, answers, sizes)
    with pytest.raises(ValueError, match="source_maps"):
        LeGrad(explained).attribute_multi(batch["pixel_values"], targets=[0], output="grid")


# ---------------------------------------------------------------------- explain_answer, CLI


def test_explain_answer_and_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """explain_answer with the real processor: one map per answer token on the original
    image; ``captum-legrad explain PHOTO --model hf:FOLDER --ask Q`` on a saved tiny Mllama
    writes the same maps."""
    from test_cli import run, save_png

    model = model_for("sdpa")
    proc = processor()
    photo = tmp_path / "pic.png"
    save_png(photo, random_image(40, 70, 9))
    from PIL import Image

    with Image.open(photo) as handle:
        image = handle.convert("RGB")
    prompt = "<|image|> what is this ?"
    result = explain_answer(model, proc, image, prompt, answer="a b c")
    assert result.tokens == ["a", "b", "c"]
    assert result.maps.shape == (3, 40, 70) and result.answer_map.shape == (40, 70)
    assert_not_vacuous(result.maps.unsqueeze(0), lead=2)
    flat = result.maps.flatten(1)
    assert bool((flat.max(1).values == 1).all()) and bool((flat.min(1).values == 0).all())
    folder = tmp_path / "mllama"
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    argv = ["explain", str(photo), "--model", f"hf:{folder}", "--ask", "what is this ?"]
    argv += ["--answer", "a b c", "--out", str(tmp_path / "o")]
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    assert "pic.png: what is this ? → a b c" in stdout
    maps = np.load(tmp_path / "o" / "pic_answer.npy")
    assert maps.shape == (3, 40, 70)
    np.testing.assert_allclose(maps, result.maps.numpy(), atol=1e-5)
    generated = explain_answer(model, proc, image, prompt, max_new_tokens=2)
    assert generated.maps.shape[1:] == (40, 70)


def test_a_configuration_without_cross_attention_layers_is_refused() -> None:
    """cross_attention_layers naming no layer of the model: it never reads the image."""
    model: Any = build()
    model.config.text_config.cross_attention_layers = [5, 7]
    batch, answers, _ = case()
    others = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    with pytest.raises(UnsupportedModelError, match=r"reads no image.*\[5, 7\].*3 decoder"):
        AnswerLogits(model, batch["input_ids"], answers, batch["attention_mask"], **others)
