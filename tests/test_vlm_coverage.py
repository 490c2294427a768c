"""Representative VLMs that answer maps do not (yet) support are refused clearly.

Issue #21's rule: no VLM that takes an image may raise anything but
``UnsupportedModelError`` (naming why), or return a silent all-zero map. Real instances of
a perceiver-resampler model (Idefics2), a Q-Former model (BLIP-2), a cross-attention model
(Mllama), a tiled model (LLaVA-NeXT) and a dynamic-resolution model (Qwen2-VL) are built at
tiny random-init configurations. A family that becomes supported (Qwen2-VL is being added)
passes as long as it is accepted without any other exception. The sweep of every class is
``benchmarks/coverage_vlm.py`` (``docs/coverage_vlm.md``): here also its processor-driven
rows (two view families built with their real processors, ``benchmarks/vlm_processors.py``)
and its verdict, which must never call a vacuous map ``works``.
"""

from __future__ import annotations

import functools
import sys
import warnings
from pathlib import Path
from typing import Any, Dict

import pytest
import torch
from torch import nn

tf = pytest.importorskip("transformers")

from _versions import requires  # noqa: E402

from captum_legrad import AnswerLogits, UnsupportedModelError  # noqa: E402

pytestmark = requires("transformers", "LlavaModel", since="transformers 4.52")

#: Sizes set wherever a (sub-)configuration has them.
_TINY: Dict[str, int] = {
    "num_hidden_layers": 1,
    "hidden_size": 64,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "depth": 1,
    "embed_dim": 64,
    "out_hidden_size": 64,
    "vision_output_dim": 64,
}

#: class -> (config class, why it is refused: a phrase of the message)
CASES = {
    "Idefics2ForConditionalGeneration": ("Idefics2Config", "perceiver"),
    "Blip2ForConditionalGeneration": ("Blip2Config", "Q-Former"),
    "MllamaForConditionalGeneration": ("MllamaConfig", "cross-attention"),
    "LlavaNextForConditionalGeneration": ("LlavaNextConfig", "tiles"),
    "Qwen2VLForConditionalGeneration": ("Qwen2VLConfig", "dynamic resolution"),
}


def _tiny(config: Any) -> Any:
    """``config`` with every nested configuration's stacks and widths made tiny."""
    stack, seen = [config], set()
    while stack:
        part = stack.pop()
        if id(part) in seen:
            continue
        seen.add(id(part))
        for key, value in _TINY.items():
            current = getattr(part, key, None)
            if isinstance(current, int) and current > value:
                setattr(part, key, value)
        for key in ("layer_types", "cross_attention_layers"):
            value = getattr(part, key, None)
            if isinstance(value, list) and key == "layer_types":
                setattr(part, key, value[: part.num_hidden_layers])
            elif isinstance(value, list):  # Mllama: which text layers cross-attend
                setattr(part, key, [0])
        stack += [v for v in vars(part).values() if isinstance(v, tf.PretrainedConfig)]
    return config


def _build(name: str) -> nn.Module:
    config_name = CASES[name][0]
    if not hasattr(tf, name) or not hasattr(tf, config_name):
        pytest.skip(f"transformers {tf.__version__} has no {name}")
    torch.manual_seed(0)
    return getattr(tf, name)(_tiny(getattr(tf, config_name)())).eval()


@pytest.mark.parametrize("name", sorted(CASES))
def test_refused_or_supported_never_another_error(name: str) -> None:
    model = _build(name)
    assert type(model).__name__ == name
    ids, answer = torch.tensor([[1, 2, 3]]), torch.tensor([[4]])
    try:
        explained = AnswerLogits(model, ids, answer)
    except UnsupportedModelError as error:
        message = str(error)
        assert name in message and CASES[name][1] in message, message
        return
    except ValueError as error:  # supported, and its image grid is a required input (Qwen)
        assert name.startswith("Qwen") and "image_grid_thw" in str(error), str(error)
        return
    # Supported (on a branch that added the family): the description is the model's own.
    spec = explained.legrad_spec()
    assert len(spec.blocks) >= 1 and spec.blocks[0] in set(model.modules())


def test_unknown_vlm_gets_the_generic_refusal() -> None:
    model = _build("LlavaNextForConditionalGeneration")
    renamed = type("SomeNewVLMForConditionalGeneration", (type(model),), {})
    model.__class__ = renamed  # an unknown class with a known layout
    with pytest.raises(UnsupportedModelError, match="not a supported vision-language model"):
        AnswerLogits(model, torch.tensor([1]), torch.tensor([2]))


def test_a_vlm_built_without_a_vision_part_is_refused() -> None:
    """Gemma 4's default configuration has no vision_config (text only): refused naming
    that, not an AttributeError from reading the missing vision configuration."""
    if not hasattr(tf, "Gemma4ForConditionalGeneration"):
        pytest.skip(f"transformers {tf.__version__} has no Gemma4ForConditionalGeneration")
    config = tf.Gemma4Config()
    assert config.vision_config is None
    with torch.device("meta"):  # the default sizes: no memory, no weights
        model = tf.Gemma4ForConditionalGeneration(config).eval()
    with pytest.raises(UnsupportedModelError, match="built without a vision part"):
        AnswerLogits(model, torch.tensor([[1, 2, 3]]), torch.tensor([[4]]))


# ------------------------------------------- the sweep's processor-driven rows (#21)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

#: Two view families the sweep drives through their real processors (cheap at the sweep's
#: tiny configurations: a few seconds each).
DRIVEN = ("Mistral3ForConditionalGeneration", "InternVLForConditionalGeneration")


@functools.cache
def _swept(name: str) -> Any:
    """The sweep's tiny model of ``name`` and the processor it built for it."""
    import coverage_vlm

    if not hasattr(tf, name):
        pytest.skip(f"transformers {tf.__version__} has no {name}")
    model, how = coverage_vlm.build(name)
    assert model is not None and how == "tiny", how
    return model, coverage_vlm.PROCESSORS[name]


@pytest.mark.parametrize("name", DRIVEN)
def test_the_sweep_drives_a_view_family_through_its_processor(name: str) -> None:
    import coverage_vlm
    from vlm_processors import image_placeholder, processor_classes

    model, processor = _swept(name)
    config = model.config
    # The family's real processor classes, as the auto mappings name them.
    classes = processor_classes(config.model_type)
    assert type(processor) is classes[0]
    assert type(processor.image_processor) is classes[1]
    # Its inputs hold the model's image token where the model puts the image features.
    image = coverage_vlm.test_image()
    placeholder = image_placeholder(processor)
    image_id = getattr(config, "image_token_id", None) or config.image_token_index
    assert processor.tokenizer.convert_tokens_to_ids(placeholder) == image_id
    batch = processor(images=[image], text=[f"a {placeholder} b"], return_tensors="pt")
    assert int((batch["input_ids"] == image_id).sum()) > 4  # expanded: one per image token
    status, detail = coverage_vlm.check(name, model, "tiny")
    assert status == "works", detail
    assert f"the {coverage_vlm.IMAGE_SIZE[0]}×{coverage_vlm.IMAGE_SIZE[1]} image" in detail


def test_the_verdict_never_calls_a_vacuous_map_works() -> None:
    """:func:`coverage_vlm.judge`: maps that vary pass; an all-zero, constant or non-finite
    map, a view map off its grid or a map off the image's size is an error."""
    import coverage_vlm

    g = torch.Generator().manual_seed(0)
    grid, size = (4, 6), (20, 30)
    good = torch.rand(3, *grid, generator=g), torch.rand(3, *size, generator=g)
    assert coverage_vlm.judge([(good[0], grid)], good[1], size, 3)[0] == "works"

    def broken(maps: torch.Tensor, token: int, value: float) -> torch.Tensor:
        maps = maps.clone()
        maps[token] = value
        return maps

    for bad in (broken(good[0], 1, 0.0), broken(good[0], 2, 0.5), broken(good[0], 0, float("nan"))):
        status, detail = coverage_vlm.judge([(bad, grid)], good[1], size, 3)
        assert status == "error" and detail.startswith("view 0: a map is"), detail
        status, detail = coverage_vlm.judge([(good[0], grid)], bad.repeat(1, 5, 5), size, 3)
        assert status == "error" and detail.startswith("on the image: a map is"), detail
    assert coverage_vlm.judge([(good[0], (6, 4))], good[1], size, 3)[0] == "error"
    assert coverage_vlm.judge([(good[0], grid)], good[1], (30, 20), 3)[0] == "error"
    assert coverage_vlm.judge([(good[0], grid)], good[1], size, 2)[0] == "error"
    assert coverage_vlm.judge([], good[1], size, 3)[0] == "error"


def test_a_driven_model_with_vacuous_maps_is_not_reported_as_works() -> None:
    """End to end: a language-model head of zeros makes every logit-lens score 0 and every
    map all zero; the driven row must say so, not ``works``."""
    import copy

    import coverage_vlm

    model, processor = _swept(DRIVEN[0])
    dead = copy.deepcopy(model)
    with torch.no_grad():
        dead.lm_head.weight.zero_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LeGrad warns about all-zero maps
        status, detail = coverage_vlm.driven(dead, processor)
    assert status == "error" and "all zero" in detail, (status, detail)


def test_the_driven_view_maps_match_the_oracle() -> None:
    """The maps the sweep judges, on its processor-built inputs, are LeGrad's: every view's
    raw map equals the oracle of ``tests/test_vlm_tiles.py`` (docs/method.md, computed from
    HF's eager attention probabilities) at that view's token positions (Mistral 3: a few
    seconds; InternVL's seven 16×16 views take ~15 s eager, left to test_vlm_more.py)."""
    import coverage_vlm
    from conftest import assert_not_vacuous
    from test_vlm_tiles import oracle_key_maps, teacher_forced
    from vlm_processors import image_placeholder

    from captum_legrad.adapters.hf.vlm import describe

    model, processor = _swept(DRIVEN[0])
    image = coverage_vlm.test_image()
    prompt = f"a {image_placeholder(processor)} what is this ?"
    batch = dict(processor(images=[image], text=[prompt], return_tensors="pt"))
    answers = processor.tokenizer("a b c", add_special_tokens=False, return_tensors="pt")
    answers = answers["input_ids"]
    full, positions = teacher_forced(batch, answers)
    expected = oracle_key_maps(model, full, positions, answers)  # (1, T, L, N)
    rules = describe(model).views
    assert rules is not None
    others = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    pixels = others.pop("pixel_values")
    if "image_sizes" in rules.consumed and "image_sizes" not in others:
        others["image_sizes"] = torch.tensor([list(coverage_vlm.IMAGE_SIZE)])
    explained = AnswerLogits(model, batch["input_ids"], answers, batch["attention_mask"], **others)
    views = explained.views(pixels)[0].views
    got = explained.view_maps(pixels, targets=range(3))[0]
    assert len(views) == len(got) >= 1
    for view, maps in zip(views, got):
        ref = expected[0][:, :, view.positions].sum(1).reshape(3, *view.grid)
        assert_not_vacuous(ref.unsqueeze(0), lead=2)
        torch.testing.assert_close(maps, ref, rtol=1e-4, atol=2e-5 * float(ref.abs().max()))
