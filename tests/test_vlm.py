"""LeGrad on a vision-language model's answer tokens (``captum_legrad.vlm``).

Tiny random-init LLaVA (Llama with grouped-query attention), PaliGemma (Gemma, one KV
head, bidirectional prefix; PaliGemma 2 with soft-capping) and Gemma 3 (SigLIP patches
pooled 2x2 in the shared fixture and 4x4 as released, sliding-window and full layers,
bidirectional image tokens), with ``sdpa`` and ``eager`` attention, against the
independent oracle in ``tests/oracle_vlm.py``.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

tf = pytest.importorskip("transformers")

from _versions import requires  # noqa: E402
from conftest import assert_not_vacuous  # noqa: E402
from oracle_vlm import answer_logits, finalize, oracle_answer_maps  # noqa: E402
from test_side_effects import assert_unchanged, snapshot  # noqa: E402

from captum_legrad import AnswerLogits, LeGrad, UnsupportedModelError, explain_answer  # noqa: E402
from captum_legrad.internals import explicit_sdpa  # noqa: E402

#: The VLMs' base-model layout (``model.model``) that AnswerLogits reads; older releases are
#: refused (tests/test_versions.py).
pytestmark = requires("transformers", "LlavaModel", since="transformers 4.52")

IMAGE = 63  # the image placeholder id of every tiny model below
TOL = 2e-5


def _llava(attn: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    vision = tf.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8, projection_dim=32,
    )  # fmt: skip
    text = tf.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=64, max_position_embeddings=128,
    )  # fmt: skip
    config = tf.LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE, image_seq_length=16
    )
    config._attn_implementation = attn
    return tf.LlavaForConditionalGeneration(config).eval()


def _paligemma(attn: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    vision = tf.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8,
    )  # fmt: skip
    text = tf.GemmaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=8, vocab_size=64, max_position_embeddings=128,
    )  # fmt: skip
    config = tf.PaliGemmaConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=IMAGE,
        projection_dim=32, hidden_size=32,
    )  # fmt: skip
    config._attn_implementation = attn
    return tf.PaliGemmaForConditionalGeneration(config).eval()


def _gemma3(attn: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    vision = tf.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=4,
    )  # fmt: skip
    text = tf.Gemma3TextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=64, max_position_embeddings=128,
        sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    )  # fmt: skip
    config = tf.Gemma3Config(
        vision_config=vision.to_dict(), text_config=text.to_dict(), mm_tokens_per_image=16,
        image_token_id=IMAGE, boi_token_id=61, eoi_token_id=62,
    )  # fmt: skip
    config._attn_implementation = attn
    model = tf.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # the image projection is zero-initialised: no image at all
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.2)
    return model


#: name -> (builder, image tokens, grid, answer token type (None: no token types),
#: prompt token types as the processor builds them)
MODELS: Dict[str, Tuple[Callable[..., nn.Module], int, Tuple[int, int], Optional[int]]] = {
    "llava": (_llava, 16, (4, 4), None),
    "paligemma": (_paligemma, 16, (4, 4), 1),
    "gemma3": (_gemma3, 16, (4, 4), 0),  # 8x8 SigLIP patches pooled 2x2 here (4x4 in Gemma 3)
}
ATTN = ("sdpa", "eager")

_cache: Dict[Tuple[str, str], nn.Module] = {}


def model_for(name: str, attn: str) -> nn.Module:
    if (name, attn) not in _cache:
        _cache[(name, attn)] = MODELS[name][0](attn)
    return _cache[(name, attn)]


def prompt(
    name: str, before: Tuple[int, ...] = (1, 2), after: Tuple[int, ...] = (5, 6, 7)
) -> Tensor:
    n = MODELS[name][1]
    middle = [61, *[IMAGE] * n, 62] if name == "gemma3" else [IMAGE] * n
    return torch.tensor([*before, *middle, *after])


def prompt_types(name: str, ids: Tensor) -> Optional[Tensor]:
    """Token types as each model's processor builds them (written here independently)."""
    if name == "paligemma":
        return torch.zeros_like(ids)  # the whole prompt is the bidirectional prefix
    if name == "gemma3":
        return (ids == IMAGE).long()  # image tokens attend to each other bidirectionally
    return None


def oracle_batch(
    name: str, prompts: list, answers: Tensor, pixels: Tensor
) -> Tuple[dict, Tensor, Tensor]:
    """The full left-padded teacher-forced sequences, built by hand for the oracle."""
    b, t = answers.shape
    s = max(len(p) for p in prompts)
    ids = torch.zeros(b, s + t, dtype=torch.long)
    mask = torch.zeros(b, s + t, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, s - len(p) : s] = p
        mask[i, s - len(p) :] = 1
    ids[:, s:] = answers
    batch: Dict[str, Any] = {"input_ids": ids, "pixel_values": pixels, "attention_mask": mask}
    answer_type = MODELS[name][3]
    if answer_type is not None:
        types = prompt_types(name, ids)
        assert types is not None
        types[:, s:] = answer_type
        batch["token_type_ids"] = types
    positions = torch.arange(s - 1, s + t - 1).expand(b, t)
    keys = torch.stack([torch.nonzero(row == IMAGE)[:, 0] for row in ids[:, :s]])
    return batch, positions, keys


def left_padded(prompts: list) -> Tuple[Tensor, Tensor]:
    s = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), s, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, s - len(p) :] = p
        mask[i, s - len(p) :] = 1
    return ids, mask


def right_padded(prompts: list) -> Tuple[Tensor, Tensor]:
    s = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), s), 3, dtype=torch.long)  # an ordinary token as padding
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
        mask[i, : len(p)] = 1
    return ids, mask


def case(name: str, seed: int = 0) -> Tuple[list, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    prompts = [prompt(name), prompt(name, before=(1,), after=(9,))]
    answers = torch.randint(4, 60, (2, 3), generator=gen)
    pixels = torch.randn(2, 3, 32, 32, generator=gen)
    return prompts, answers, pixels


# ---------------------------------------------------------------------------- the oracle


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_answer_logits_are_the_models_logits(name: str, attn: str) -> None:
    model = model_for(name, attn)
    prompts, answers, pixels = case(name)
    ids, mask = left_padded(prompts)
    batch, positions, _ = oracle_batch(name, prompts, answers, pixels)
    expected = answer_logits(model, batch, positions, answers)
    got = AnswerLogits(model, ids, answers, mask)(pixels)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    summed = AnswerLogits(model, ids, answers, mask, reduce="sum")(pixels)
    torch.testing.assert_close(summed, expected.sum(1, keepdim=True), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_maps_match_oracle(name: str, attn: str) -> None:
    model = model_for(name, attn)
    prompts, answers, pixels = case(name)
    ids, mask = left_padded(prompts)
    batch, positions, keys = oracle_batch(name, prompts, answers, pixels)
    grid = MODELS[name][2]
    expected = oracle_answer_maps(model, batch, positions, answers, keys, grid)  # (B,T,L,g,g)
    assert expected.sum(dim=(0, 1, 3, 4)).gt(0).all(), "an oracle layer map is all zero"
    assert_not_vacuous(expected, lead=3)  # every (sample, answer token, layer)
    legrad = LeGrad(AnswerLogits(model, ids, answers, mask))
    raw = legrad.attribute_multi(pixels, targets=range(3), output="grid", normalize=False)
    torch.testing.assert_close(raw, expected.sum(2), rtol=1e-4, atol=TOL * expected.abs().max())
    maps = legrad.attribute_multi(pixels, targets=range(3))
    torch.testing.assert_close(maps, finalize(expected, (32, 32)), rtol=1e-4, atol=1e-4)
    per_layer = legrad.attribute_layers(pixels, target=1)
    torch.testing.assert_close(
        per_layer, expected[:, 1], rtol=1e-4, atol=TOL * expected.abs().max()
    )
    one = legrad.attribute(pixels, target=2, output="map")
    torch.testing.assert_close(one[:, 0], maps[:, 2], rtol=1e-5, atol=1e-6)
    # A repeated token cannot share a backward with itself: the batched path, same maps.
    repeated = legrad.attribute_multi(pixels, targets=[2, 0, 2], output="grid", normalize=False)
    torch.testing.assert_close(
        repeated, expected.sum(2)[:, [2, 0, 2]], rtol=1e-4, atol=TOL * expected.abs().max()
    )


@pytest.mark.parametrize("name", sorted(MODELS))
def test_last_layer_only(name: str) -> None:
    model = model_for(name, "sdpa")
    prompts, answers, pixels = case(name, seed=1)
    ids, mask = left_padded(prompts)
    batch, positions, keys = oracle_batch(name, prompts, answers, pixels)
    grid = MODELS[name][2]
    expected = oracle_answer_maps(model, batch, positions, answers, keys, grid, layers=[-1])
    assert_not_vacuous(expected, lead=3)
    maps = LeGrad(AnswerLogits(model, ids, answers, mask), layers=[-1]).attribute_multi(
        pixels, targets=range(3)
    )
    torch.testing.assert_close(maps, finalize(expected, (32, 32)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_whole_answer(name: str) -> None:
    model = model_for(name, "eager")
    prompts, answers, pixels = case(name, seed=2)
    ids, mask = left_padded(prompts)
    batch, positions, keys = oracle_batch(name, prompts, answers, pixels)
    grid = MODELS[name][2]
    per_token = oracle_answer_maps(model, batch, positions, answers, keys, grid)
    of_sum = oracle_answer_maps(model, batch, positions, answers, keys, grid, summed=True)
    assert_not_vacuous(per_token, lead=3)
    assert_not_vacuous(of_sum, lead=3)
    whole = LeGrad(AnswerLogits(model, ids, answers, mask, reduce="sum")).attribute(
        pixels, output="grid", normalize=False
    )
    assert whole.shape == (2, 1, 4, 4)
    torch.testing.assert_close(whole, of_sum.sum(2), rtol=1e-4, atol=TOL * of_sum.abs().max())
    tokens = LeGrad(AnswerLogits(model, ids, answers, mask)).attribute_multi(
        pixels, targets=range(3), output="grid", normalize=False
    )
    summed_tokens = tokens.sum(1, keepdim=True)
    expected = per_token.sum(dim=(1, 2)).unsqueeze(1)
    torch.testing.assert_close(summed_tokens, expected, rtol=1e-4, atol=TOL * expected.max())
    # The ReLU is taken per token: ReLU(sum of gradients) <= sum of ReLU(gradients).
    assert torch.all(whole <= summed_tokens * (1 + 1e-5) + 1e-9)


# ---------------------------------------------------------------------- batch and padding


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_batch_equals_single(name: str, attn: str, side: str) -> None:
    model = model_for(name, attn)
    prompts, answers, pixels = case(name, seed=3)
    ids, mask = (left_padded if side == "left" else right_padded)(prompts)
    batched = LeGrad(AnswerLogits(model, ids, answers, mask)).attribute_multi(
        pixels, targets=range(3)
    )
    for i, p in enumerate(prompts):
        alone = LeGrad(AnswerLogits(model, p, answers[i])).attribute_multi(
            pixels[i : i + 1], targets=range(3)
        )
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=1e-4, atol=1e-4)


def test_padding_is_not_read_as_image() -> None:
    model = model_for("llava", "sdpa")
    prompts, answers, pixels = case("llava")
    ids, mask = right_padded(prompts)
    ids[1, -1] = IMAGE  # a padding position holding the image id is not an image token
    with pytest.raises(ValueError, match="exactly one image"):
        AnswerLogits(model, ids, answers, mask)(pixels)


def test_one_prompt_for_many_images_and_chunks() -> None:
    model = model_for("llava", "sdpa")
    prompts, answers, pixels = case("llava", seed=4)
    shared = AnswerLogits(model, prompts[0], answers[0])
    maps = LeGrad(shared).attribute_multi(pixels, targets=range(3))
    for i in range(2):
        alone = LeGrad(shared).attribute_multi(pixels[i : i + 1], targets=range(3))
        torch.testing.assert_close(maps[i : i + 1], alone, rtol=1e-4, atol=1e-4)
    ids, mask = left_padded(prompts)
    explained = AnswerLogits(model, ids, answers, mask)
    whole = LeGrad(explained).attribute_multi(pixels, targets=range(3))
    chunked = LeGrad(explained).attribute_multi(
        pixels,
        targets=range(3),
        additional_forward_args=(ids, answers, mask),
        internal_batch_size=1,
    )
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="additional_forward_args"):
        LeGrad(explained).attribute_multi(pixels, targets=range(3), internal_batch_size=1)


def test_noise_tunnel() -> None:
    from captum.attr import NoiseTunnel

    model = model_for("paligemma", "sdpa")
    prompts, answers, pixels = case("paligemma", seed=5)
    ids, mask = left_padded(prompts)
    legrad = LeGrad(AnswerLogits(model, ids, answers, mask))
    smooth = NoiseTunnel(legrad).attribute(pixels, nt_samples=3, stdevs=0.0, target=1)
    plain = legrad.attribute(pixels, target=1)
    torch.testing.assert_close(smooth, plain, rtol=1e-4, atol=1e-4)
    noisy = NoiseTunnel(legrad).attribute(pixels, nt_samples=2, stdevs=0.1, target=0)
    assert noisy.shape == pixels.shape and torch.isfinite(noisy).all()


# ------------------------------------------------------------------------- side effects


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_unchanged(name: str, attn: str) -> None:
    model = model_for(name, attn)
    prompts, answers, pixels = case(name)
    ids, mask = left_padded(prompts)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    before = snapshot(model)
    LeGrad(AnswerLogits(model, ids, answers, mask)).attribute_multi(pixels, targets=range(3))
    assert_unchanged(before, snapshot(model))
    after = model.state_dict()
    assert state.keys() == after.keys()
    for key, value in state.items():
        assert torch.equal(value, after[key]) and value.dtype == after[key].dtype, key
    assert model.config.to_dict() == config
    assert model.config._attn_implementation == attn


def test_threads_share_one_model() -> None:
    model = model_for("gemma3", "sdpa")
    prompts, answers, pixels = case("gemma3", seed=6)
    ids, mask = left_padded(prompts)
    explained = AnswerLogits(model, ids, answers, mask)
    expected = LeGrad(explained).attribute_multi(pixels, targets=range(3))
    results: list = [None] * 3

    def run(i: int) -> None:
        results[i] = LeGrad(explained).attribute_multi(pixels, targets=range(3))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ refusals


def test_unsupported_models_are_refused() -> None:
    video = type("LlavaNextVideoForConditionalGeneration", (nn.Module,), {})()
    with pytest.raises(UnsupportedModelError, match="tiles the image"):
        AnswerLogits(video, torch.tensor([1]), torch.tensor([2]))
    resampled = type("Idefics2ForConditionalGeneration", (nn.Module,), {})()
    with pytest.raises(UnsupportedModelError, match="perceiver"):
        AnswerLogits(resampled, torch.tensor([1]), torch.tensor([2]))
    with pytest.raises(UnsupportedModelError, match="not a supported vision-language"):
        AnswerLogits(nn.Linear(2, 2), torch.tensor([1]), torch.tensor([2]))


def test_bad_arguments() -> None:
    model = model_for("llava", "sdpa")
    prompts, answers, pixels = case("llava")
    with pytest.raises(ValueError, match="exactly one image"):
        AnswerLogits(model, torch.tensor([1, 2, 3]), answers[0])(pixels[:1])
    with pytest.raises(ValueError, match="answer_ids is empty"):
        AnswerLogits(model, prompts[0], torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="resize the images"):
        AnswerLogits(model, prompts[0], answers[0])(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="reduce"):
        AnswerLogits(model, prompts[0], answers[0], reduce="mean")
    with pytest.raises(ValueError, match="must match"):
        AnswerLogits(model, prompts[0], answers[0], torch.ones(3))
    float_mask = torch.ones(len(prompts[0]))  # float and bool masks are fine
    out = AnswerLogits(model, prompts[0], answers[0], float_mask)(pixels[:1])
    assert out.shape == (1, 3)


def test_explicit_sdpa_fully_masked_rows_match_fused() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=gen) for _ in range(3))
    keep = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    keep[0, :, :2, :2] = False  # left padding: rows 0 and 1 of sample 0 see no key
    keep[0, :, 2:, :2] = False
    for mask in (keep, torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))):
        q_ = q.clone().requires_grad_()
        out, probs = explicit_sdpa(q_, k, v, attn_mask=mask)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        assert torch.equal(probs[0, :, :2], torch.zeros_like(probs[0, :, :2]))
        (grad,) = torch.autograd.grad(out.sum(), q_)
        assert torch.isfinite(grad).all()


# ------------------------------------------------------------------------ the helper


class _Tokenizer:
    """A word-level tokenizer over a tiny vocabulary (built offline)."""

    def __init__(self) -> None:
        from tokenizers import Tokenizer, models, pre_tokenizers

        words = ["<pad>", "<eos>", "<image>", *[f"w{i}" for i in range(60)]]
        vocab = {w: i for i, w in enumerate(words)}
        vocab["<image>"] = IMAGE
        vocab["w60"] = 2
        inner = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
        inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        self.fast = tf.PreTrainedTokenizerFast(
            tokenizer_object=inner, pad_token="<pad>", eos_token="<eos>"
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fast, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fast(*args, **kwargs)


class _Processor:
    """The interface of a LLaVA processor: expands ``<image>`` and resizes the image."""

    def __init__(self) -> None:
        self.tokenizer = _Tokenizer()

    def __call__(self, images: list, text: list, return_tensors: str) -> Dict[str, Tensor]:
        expanded = [t.replace("<image>", " ".join(["<image>"] * 16)) for t in text]
        batch = self.tokenizer(expanded, return_tensors="pt", add_special_tokens=False)
        pixels = torch.stack([F.interpolate(i[None], size=(32, 32))[0] for i in images])
        return {**batch, "pixel_values": pixels}


def test_explain_answer_generates_and_explains() -> None:
    model = model_for("llava", "sdpa")
    processor = _Processor()
    image = torch.randn(3, 40, 40, generator=torch.Generator().manual_seed(7))
    result = explain_answer(model, processor, image, "w1 <image> w5 w6", max_new_tokens=4)
    inputs = processor(images=[image], text=["w1 <image> w5 w6"], return_tensors="pt")
    ids = inputs["input_ids"]
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)[0, ids.shape[1] :]
    special = set(processor.tokenizer.all_special_ids)
    expected_ids = generated.tolist()
    while expected_ids[-1] in special:  # trailing end of sequence / padding
        expected_ids.pop()
    assert result.answer_ids.tolist() == expected_ids
    assert len(result.tokens) == len(expected_ids) == result.maps.shape[0]
    assert result.maps.shape[1:] == (32, 32) and result.answer_map.shape == (32, 32)
    direct = LeGrad(AnswerLogits(model, ids, torch.tensor(expected_ids))).attribute_multi(
        result.pixel_values, targets=range(len(expected_ids))
    )[0]
    torch.testing.assert_close(result.maps, direct, rtol=1e-5, atol=1e-6)


def test_explain_answer_given_answer() -> None:
    model = model_for("llava", "eager")
    processor = _Processor()
    image = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(8))
    result = explain_answer(model, processor, image, "<image> w3", answer="w7 w8 w9")
    assert result.tokens == ["w7", "w8", "w9"] and result.text == "w7 w8 w9"
    assert result.answer_ids.tolist() == [10, 11, 12]  # w0 is id 3
    whole = LeGrad(
        AnswerLogits(
            model,
            processor(images=[image], text=["<image> w3"], return_tensors="pt")["input_ids"],
            result.answer_ids,
            reduce="sum",
        )
    ).attribute(result.pixel_values, output="map")
    assert result.answer_map.max() == 1.0
    assert whole.shape == (1, 1, 32, 32)


def test_plot_answer() -> None:
    pytest.importorskip("matplotlib")
    from captum_legrad.viz import plot_answer

    maps = torch.rand(3, 32, 32)
    figure = plot_answer(torch.rand(3, 32, 32), maps, ["a", "cat", "."], answer_map=maps[0])
    assert len([ax for ax in figure.axes if ax.images]) == 5  # image, 3 tokens, whole
    titles = [ax.get_title() for ax in figure.axes if ax.images]
    assert titles == ["image", "'a'", "'cat'", "'.'", "whole answer"]


def test_llava_full_strategy_skips_cls() -> None:
    """``vision_feature_select_strategy="full"``: 17 image tokens, the first (CLS) no patch."""
    torch.manual_seed(0)
    vision = tf.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8,
    )  # fmt: skip
    text = tf.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=64,
    )  # fmt: skip
    config = tf.LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE,
        vision_feature_select_strategy="full",
    )  # fmt: skip
    model = tf.LlavaForConditionalGeneration(config).eval()
    ids = torch.tensor([1, 2, *[IMAGE] * 17, 5, 6])
    answers = torch.tensor([[7, 8]])
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    full = torch.cat([ids[None], answers], dim=1)
    batch = {"input_ids": full, "pixel_values": pixels, "attention_mask": torch.ones_like(full)}
    s = ids.shape[0]
    keys = torch.arange(3, 19)[None]  # positions 3..18: the 16 patches after CLS (position 2)
    positions = torch.arange(s - 1, s + 1)[None]
    expected = oracle_answer_maps(model, batch, positions, answers, keys, (4, 4))
    assert_not_vacuous(expected, lead=3)
    maps = LeGrad(AnswerLogits(model, ids, answers)).attribute_multi(
        pixels, targets=range(2), output="grid", normalize=False
    )
    torch.testing.assert_close(maps, expected.sum(2), rtol=1e-4, atol=TOL * expected.max())


def test_paligemma2_softcapping() -> None:
    """PaliGemma 2 (Gemma 2 text: final-logit and attention soft-capping, sliding layers;
    transformers runs Gemma 2 with eager attention only)."""
    attn = "eager"
    torch.manual_seed(0)
    vision = tf.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8,
    )  # fmt: skip
    text = tf.Gemma2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=64, sliding_window=8,
        final_logit_softcapping=0.5, attn_logit_softcapping=50.0,
    )  # fmt: skip
    config = tf.PaliGemmaConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=IMAGE,
        projection_dim=32, hidden_size=32,
    )  # fmt: skip
    config._attn_implementation = attn
    model = tf.PaliGemmaForConditionalGeneration(config).eval()
    prompts, answers, pixels = case("paligemma", seed=10)
    ids, mask = right_padded(prompts)
    batch, positions, keys = oracle_batch("paligemma", prompts, answers, pixels)
    logits = answer_logits(model, batch, positions, answers)
    assert logits.abs().max() < 0.5  # capped at 0.5
    explained = AnswerLogits(model, ids, answers, mask)
    torch.testing.assert_close(explained(pixels), logits, rtol=1e-4, atol=1e-5)
    expected = oracle_answer_maps(model, batch, positions, answers, keys, (4, 4), softcap=0.5)
    assert_not_vacuous(expected, lead=3)
    maps = LeGrad(explained).attribute_multi(
        pixels, targets=range(3), output="grid", normalize=False
    )
    torch.testing.assert_close(maps, expected.sum(2), rtol=1e-4, atol=TOL * expected.max())


def test_copies_and_captum_metrics() -> None:
    import copy

    from captum.metrics import infidelity, sensitivity_max

    model = model_for("llava", "sdpa")
    prompts, answers, pixels = case("llava", seed=11)
    ids, mask = left_padded(prompts)
    explained = AnswerLogits(model, ids, answers, mask)
    legrad = LeGrad(explained)
    maps = legrad.attribute(pixels, target=1)
    twin = copy.deepcopy(explained)
    torch.testing.assert_close(LeGrad(twin).attribute(pixels, target=1), maps)

    def perturb(inputs: Tensor) -> Tuple[Tensor, Tensor]:
        noise = torch.randn_like(inputs) * 0.01
        return noise, inputs - noise

    score = infidelity(explained, perturb, pixels, maps, target=1, n_perturb_samples=2)
    assert score.shape == (2,) and torch.isfinite(score).all()
    sens = sensitivity_max(legrad.attribute, pixels, target=1, n_perturb_samples=2)
    assert sens.shape == (2,) and torch.isfinite(sens).all()


def test_gemma3_pools_four_by_four() -> None:
    """As released: 16x16 SigLIP patches average-pooled 4x4 into a 4x4 token grid."""
    torch.manual_seed(0)
    vision = tf.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=64, patch_size=4,
    )  # fmt: skip
    text = tf.Gemma3TextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=64, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip
    config = tf.Gemma3Config(
        vision_config=vision.to_dict(), text_config=text.to_dict(), mm_tokens_per_image=16,
        image_token_id=IMAGE, boi_token_id=61, eoi_token_id=62,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    model = tf.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.2)
    explained = AnswerLogits(model, prompt("gemma3"), torch.tensor([[7, 8]]))
    spec = explained.legrad_spec()
    assert spec.grid_size(64, 64) == (4, 4) and spec.patch_size == (16, 16)
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(12))
    batch, positions, keys = oracle_batch(
        "gemma3", [prompt("gemma3")], torch.tensor([[7, 8]]), pixels
    )
    expected = oracle_answer_maps(model, batch, positions, torch.tensor([[7, 8]]), keys, (4, 4))
    assert_not_vacuous(expected, lead=3)
    maps = LeGrad(explained).attribute_multi(pixels, targets=range(2))
    assert maps.shape == (1, 2, 64, 64)
    torch.testing.assert_close(maps, finalize(expected, (64, 64)), rtol=1e-4, atol=1e-4)


def test_view_helpers_on_one_grid() -> None:
    """Families on one grid have one view per sample: view_maps is the raw grid map,
    source_maps the normalised map."""
    model = model_for("gemma3", "sdpa")
    prompts, answers, pixels = case("gemma3", seed=13)
    ids, mask = left_padded(prompts)
    explained = AnswerLogits(model, ids, answers, mask)
    legrad = LeGrad(explained)
    grid = legrad.attribute_multi(pixels, targets=range(3), output="grid", normalize=False)
    views = explained.view_maps(pixels)
    assert len(views) == 2 and all(len(v) == 1 for v in views)
    torch.testing.assert_close(torch.stack([v[0] for v in views]), grid)
    maps = legrad.attribute_multi(pixels, targets=range(3))
    canvases = explained.source_maps(pixels)
    torch.testing.assert_close(torch.stack([c[0] for c in canvases]), maps, rtol=1e-5, atol=1e-6)
    keys = explained.views(pixels)[0].views[0].positions
    assert keys.tolist() == torch.nonzero(ids[0] == IMAGE)[:, 0].tolist()
