"""Coverage of the vision-language models of the installed ``transformers`` through
:class:`~captum_legrad.AnswerLogits`.

Every class of the image-text-to-text and multimodal-LM auto mappings
(``MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES``, ``MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES``,
and the Vision2Seq mapping where the release has it) whose configuration has a vision part
is built at a tiny random-init configuration: the default configuration's sizes shrunk
generically (:func:`shrink`: 1 layer per stack, widths 32–64, at most 2 experts; nothing
is downloaded). Where the tiny build fails, the class is built at its default configuration
on the meta device (no memory, no weights), which is enough to see whether
``AnswerLogits`` refuses it; where neither builds offline (incomplete default
configurations), an instance of the class whose ``__init__`` did not run (``stub``).

A row is ``works`` when ``AnswerLogits`` builds, ``LeGrad(...).attribute_multi`` gives a map
per answer token and no map is all zero or constant; ``refused`` when ``AnswerLogits``
raises ``UnsupportedModelError`` (its message is the detail); ``error`` otherwise (the rule
of issue #21: no VLM that takes an image may raise anything else, or return a silent
all-zero map). ``skipped`` rows could not be built at all offline (the reason is given).

The classes described through views (:func:`view_classes`: the ``CLASSES`` of every module
of ``VIEW_FAMILIES``) get their inputs from **their real processor**, built offline from
the tiny configuration by :func:`vlm_processors.offline_processor` before the model (it sets
the configuration's token ids), and are run on a non-square image (:func:`driven`):
``works`` only if every view's map has its view's grid and the maps on the image are at the
original size, none vacuous (:func:`judge`). ``accepted``: ``AnswerLogits`` takes the class
but its processor cannot be built offline (the reason is given). Qwen-VL keeps its
hand-laid inputs (its prompt's vision start/end tokens come from a checkpoint's chat
template). Exactness against an independent oracle is the job of ``tests/test_vlm.py``,
``tests/test_vlm_tiles.py`` and ``tests/test_vlm_more.py``.

Run alone: ``python benchmarks/coverage_vlm.py`` prints a Markdown table and the counts
(``--markdown docs/coverage_vlm.md`` writes the page).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

#: (class, status, build, detail)
Row = Tuple[str, str, str, str]

#: Config attributes set, wherever a (sub-)configuration has them, for a tiny build.
SMALL: Dict[str, Any] = {
    "num_hidden_layers": 1,
    "num_layers": 1,
    "depth": 1,
    "encoder_layers": 1,
    "decoder_layers": 1,
    "num_decoder_layers": 1,
    "num_encoder_layers": 1,
    "vision_layers": 1,
    "text_layers": 1,
    "hidden_size": 64,
    "d_model": 64,
    "embed_dim": 64,
    "n_embd": 64,
    "width": 64,
    "intermediate_size": 64,
    "ffn_dim": 64,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "num_attention_heads": 4,
    "num_heads": 4,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_experts": 2,
    "num_local_experts": 2,
    "n_routed_experts": 2,
    "num_experts_per_tok": 1,
    "n_shared_experts": 1,
    "out_hidden_size": 64,
    "projection_dim": 64,
    "vision_output_dim": 64,
    "projector_input_dim": 64,
    "projector_output_dim": 64,
    "first_k_dense_replace": 0,
}


def vlm_classes() -> List[str]:
    """The image-taking generation classes of the installed transformers' auto mappings."""
    from transformers.models.auto import modeling_auto

    names: Dict[str, str] = {}
    for attr in (
        "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
        "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES",
        "MODEL_FOR_VISION_2_SEQ_MAPPING_NAMES",
    ):
        for model_type, value in getattr(modeling_auto, attr, {}).items():
            for name in value if isinstance(value, (tuple, list)) else (value,):
                names.setdefault(name, model_type)
    return sorted(names)


def _config_class(name: str) -> Optional[Any]:
    """The configuration class of model class ``name`` (None if transformers lacks it)."""
    import transformers

    cls = getattr(transformers, name, None)
    return None if cls is None else getattr(cls, "config_class", None)


def _sub_configs(config: Any) -> List[Any]:
    """``config`` and every configuration nested in it."""
    from transformers import PretrainedConfig

    found, stack, seen = [], [config], set()
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        found.append(current)
        for value in vars(current).values():
            if isinstance(value, PretrainedConfig):
                stack.append(value)
    return found


def takes_images(config: Any) -> bool:
    """Whether the configuration (or one nested in it) has a vision part: a vision, image
    or video sub-configuration, or image token ids."""
    words = ("vision", "image", "visual", "video", "pixel", "vit")
    for part in _sub_configs(config):
        names = " ".join([*vars(part), str(getattr(part, "model_type", ""))]).lower()
        if any(word in names for word in words):
            return True
    return False


def shrink(config: Any) -> Any:
    """``config`` with every stack at 1 layer, widths at 32–64 and sizes kept consistent
    (attention layer-type lists cut to the layer count, the vocabulary holding every token
    id the configuration names). Image sizes are kept: they fix the image-token counts."""
    for part in _sub_configs(config):
        for key, value in SMALL.items():
            current = getattr(part, key, None)
            if isinstance(current, int) and not isinstance(current, bool) and current > value:
                setattr(part, key, value)
        heads = getattr(part, "num_attention_heads", None)
        kv = getattr(part, "num_key_value_heads", None)
        if isinstance(heads, int) and isinstance(kv, int) and kv > heads:
            part.num_key_value_heads = heads
        for key in ("layer_types", "mlp_layer_types", "attention_layer_types"):
            value = getattr(part, key, None)
            layers = getattr(part, "num_hidden_layers", None)
            if isinstance(value, list) and isinstance(layers, int):
                setattr(part, key, value[:layers])
        # Cross-attention layer indices (Mllama): kept within the layer count, at least one,
        # or the model would never read the image.
        cross = getattr(part, "cross_attention_layers", None)
        layers = getattr(part, "num_hidden_layers", None)
        if isinstance(cross, list) and isinstance(layers, int):
            part.cross_attention_layers = [i for i in cross if i < layers] or [layers - 1]
        # Intermediate vision layers concatenated to the output (Mllama): within the layer
        # count, and the output width their concatenation gives.
        picked = getattr(part, "intermediate_layers_indices", None)
        if isinstance(picked, list) and isinstance(layers, int):
            part.intermediate_layers_indices = [i for i in picked if i < layers] or [0]
            if hasattr(part, "vision_output_dim"):
                count = len(part.intermediate_layers_indices) + 1
                part.vision_output_dim = int(part.hidden_size) * count
        for key in ("depths",):
            value = getattr(part, key, None)
            if isinstance(value, list):
                setattr(part, key, [1] * len(value))
    # Qwen-VL's M-RoPE sections (temporal, height, width) must sum to half the head width.
    for part in _sub_configs(config):
        for key in ("rope_parameters", "rope_scaling"):
            rope = getattr(part, key, None)
            kind = str(getattr(part, "model_type", ""))
            multi = "mrope_section" in (rope or {}) or ("vl" in kind and "text" in kind)
            if isinstance(rope, dict) and multi:  # Qwen2-VL's default: [16, 24, 24]
                heads = int(getattr(part, "num_attention_heads", 1) or 1)
                head = getattr(part, "head_dim", None) or int(part.hidden_size) // heads
                half = int(head) // 2
                rope["mrope_section"] = [half - 2 * (half // 4), half // 4, half // 4]
    # Gemma 3's pooling: mm_tokens_per_image must pool the vision patch grid evenly.
    vision = getattr(config, "vision_config", None)
    if hasattr(config, "mm_tokens_per_image") and vision is not None:
        side = int(vision.image_size) // int(vision.patch_size)
        tokens_side = side // 2 if side % 2 == 0 else side
        config.mm_tokens_per_image = tokens_side * tokens_side
    # Pixel shuffle (Idefics3, SmolVLM): the vision patch grid must split into
    # scale_factor × scale_factor groups; the patch size is made so (224 / 32 = 7 → 28).
    scale = getattr(config, "scale_factor", None)
    if isinstance(scale, int) and scale > 1 and vision is not None:
        size, patch = int(vision.image_size), int(vision.patch_size)
        if (size // patch) % scale:
            vision.patch_size = size // (-(-(size // patch) // scale) * scale)
    # Pixel shuffle by a ratio (Llama 4): the projector MLP takes the shuffled patches,
    # hidden_size / ratio² wide, through the tower's intermediate_size.
    ratio = getattr(vision, "pixel_shuffle_ratio", None)
    if isinstance(ratio, float) and 0 < ratio < 1 and vision is not None:
        vision.intermediate_size = round(vision.hidden_size / ratio**2)
    # Token ids (image placeholders) beyond a shrunk or default vocabulary: grow it.
    ids = [
        v
        for part in _sub_configs(config)
        for k, v in vars(part).items()
        if k.endswith("token_id") or k.endswith("token_index")
        if isinstance(v, int) and not isinstance(v, bool)
    ]
    for part in _sub_configs(config):
        vocab = getattr(part, "vocab_size", None)
        if isinstance(vocab, int) and ids and max(ids) >= vocab:
            part.vocab_size = max(ids) + 1
    return config


def _randomize(model: torch.nn.Module) -> None:
    """Random values (HF's init scale) for the all-zero tensors HF initialises: projectors,
    gates (scalars too: Mllama's tanh(0) gates shut its cross-attention), tables; an all-zero
    projector makes every image token the same."""
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.is_floating_point() and tensor.numel() > 0 and not tensor.any():
                tensor.normal_(0.0, 0.02)


#: The non-square test image of the processor-driven rows, ``(3, H, W)``.
IMAGE_SIZE = (200, 300)


def view_classes() -> List[str]:
    """The classes described through views (the ``CLASSES`` of every module of
    :data:`captum_legrad.adapters.hf.vlm.VIEW_FAMILIES`): their inputs are built by their
    own processor (:func:`vlm_processors.offline_processor`)."""
    from captum_legrad.adapters.hf.vlm import VIEW_FAMILIES

    return [name for module in VIEW_FAMILIES for name in module.CLASSES]


def test_image() -> torch.Tensor:
    """The processor-driven rows' image: random, non-square, in [0, 1]."""
    return torch.rand(3, *IMAGE_SIZE, generator=torch.Generator().manual_seed(0))


#: Processors built for the tiny configurations (class -> processor, or the reason why
#: none was built offline).
PROCESSORS: Dict[str, Any] = {}


def build(name: str) -> Tuple[Optional[torch.nn.Module], str]:
    """Model class ``name`` at a tiny configuration, or at its default configuration on the
    meta device (``(model, how)``); ``(None, reason)`` if neither builds. A class described
    through views gets its processor first (:data:`PROCESSORS`), built offline from the
    tiny configuration, whose token ids it sets."""
    import transformers
    from vlm_processors import offline_processor

    cls = getattr(transformers, name, None)
    config_cls = _config_class(name)
    if cls is None or config_cls is None:
        return None, f"not in transformers {transformers.__version__}"
    try:
        config = config_cls()
    except Exception as error:
        return None, f"default config fails: {type(error).__name__}: {error}"[:200]
    if not takes_images(config):
        return None, "no vision part in its configuration"
    errors = []
    try:
        tiny = shrink(config_cls())
        tiny._attn_implementation = "sdpa"
        if name in view_classes() and name not in QWEN:
            try:
                PROCESSORS[name] = offline_processor(tiny, test_image())
            except Exception as error:  # a missing optional dependency, an unknown layout
                PROCESSORS[name] = f"{type(error).__name__}: {error}"[:200]
        torch.manual_seed(0)
        model = cls(tiny).eval()
        _randomize(model)
        return model, "tiny"
    except Exception as error:
        errors.append(f"{type(error).__name__}: {error}")
    try:
        with torch.device("meta"):
            model = cls(config_cls()).eval()
        return model, f"meta (tiny build: {errors[0][:120]})"
    except Exception as error:
        errors.append(f"{type(error).__name__}: {error}")
    # Neither configuration builds (its defaults are incomplete offline): an instance of the
    # class without running its __init__, enough for AnswerLogits' check of the class.
    model = cls.__new__(cls)
    torch.nn.Module.__init__(model)
    return model, f"stub (no configuration builds offline: {errors[-1][:120]})"


def _inputs(model: Any) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A prompt holding one image's tokens, a 3-token answer and one image, for the models
    whose image is one fixed-size grid (what :func:`captum_legrad.adapters.hf.vlm.describe`
    gives)."""
    from captum_legrad.adapters.hf.vlm import describe

    parts = describe(model)
    vision = model.config.vision_config
    side = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
    image = parts.image_token_id
    prompt = torch.tensor([[1, *[image] * parts.tokens_per_image, 2]])
    if parts.family == "Gemma3ForConditionalGeneration":
        begin, end = model.config.boi_token_id, model.config.eoi_token_id
        prompt = torch.tensor([[1, begin, *[image] * parts.tokens_per_image, end, 2]])
    answer = torch.tensor([[3, 4, 5]])
    pixels = torch.randn(1, getattr(vision, "num_channels", 3), side, side)
    return prompt, answer, pixels


QWEN = (
    "Qwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration",
    "Qwen3VLForConditionalGeneration",
    "Qwen3VLMoeForConditionalGeneration",
)


def _qwen_inputs(model: Any) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Dict[str, Any]]:
    """One image of ``2·merge × 2·merge`` patches (4 tokens after the merger) as Qwen's
    processor lays it out: flattened patches, ``image_grid_thw``, the vision start/end tokens
    around the image tokens and ``mm_token_type_ids``."""
    config = model.config
    vision = config.vision_config
    merge = int(vision.spatial_merge_size)
    width = int(getattr(vision, "in_channels", None) or getattr(vision, "in_chans", None) or 3)
    width *= int(vision.temporal_patch_size) * int(vision.patch_size) ** 2
    side = 2 * merge
    pixels = torch.randn(side * side, width)
    image = int(config.image_token_id)
    start, end = int(config.vision_start_token_id), int(config.vision_end_token_id)
    prompt = torch.tensor([[1, start, *[image] * 4, end, 2]])
    extra = {
        "image_grid_thw": torch.tensor([[1, side, side]]),
        "mm_token_type_ids": (prompt == image).long(),
    }
    return prompt, torch.tensor([[3, 4, 5]]), pixels, extra


def _reason(error: Exception) -> str:
    """The refusal's reason: its message up to the list of supported models."""
    return str(error).split(";")[0].split(": LeGrad's answer maps support")[0]


def check(name: str, model: torch.nn.Module, how: str) -> Tuple[str, str]:
    """``(status, detail)`` of one built class."""
    from captum_legrad import AnswerLogits, LeGrad, UnsupportedModelError

    try:
        if name in QWEN and how == "tiny":  # its inputs name the image's grid
            prompt, answer, _, grid = _qwen_inputs(model)
            AnswerLogits(model, prompt, answer, **grid)
        else:
            AnswerLogits(model, torch.tensor([1]), torch.tensor([2]))
    except UnsupportedModelError as error:
        return "refused", _reason(error)
    except Exception as error:
        return "error", f"{type(error).__name__}: {error}"[:300]
    if how != "tiny":
        return "error", f"accepted but not built tiny: {how}"
    from captum_legrad.adapters.hf.vlm import describe

    extra: Dict[str, Any] = {}
    try:
        if name in QWEN:
            prompt, answer, pixels, extra = _qwen_inputs(model)
        elif describe(model).views is not None:
            processor = PROCESSORS.get(name)
            if not isinstance(processor, str) and processor is not None:
                return driven(model, processor)
            return "accepted", (
                "AnswerLogits accepts it; its processor could not be built offline "
                f"({processor or 'the auto mappings name none'})"
            )
        else:
            prompt, answer, pixels = _inputs(model)
        maps = LeGrad(AnswerLogits(model, prompt, answer, **extra)).attribute_multi(
            pixels, targets=range(answer.shape[1]), output="grid", normalize=False
        )
    except UnsupportedModelError as error:
        return "refused", _reason(error)
    except Exception as error:
        return "error", f"{type(error).__name__}: {error}"[:300]
    fault = vacuous(maps[0])
    if fault is not None:
        return "error", fault
    return "works", f"{answer.shape[1]} token maps on a {tuple(maps.shape[-2:])} grid"


def vacuous(maps: torch.Tensor) -> Optional[str]:
    """What is wrong with per-token maps ``(K, ...)``: not finite, a token's map all zero or
    constant; None when every map is finite and varies."""
    flat = maps.flatten(1).float()
    if not bool(torch.isfinite(flat).all()):
        return "a map is not finite"
    if bool((flat == 0).all(dim=1).any()):
        return "a map is all zero"
    if bool((flat.amax(1) == flat.amin(1)).any()):
        return "a map is constant"
    return None


def judge(
    grids: Sequence[Tuple[torch.Tensor, Tuple[int, ...]]],
    maps: torch.Tensor,
    size: Tuple[int, int],
    tokens: int,
) -> Tuple[str, str]:
    """The verdict of a processor-driven row: ``works`` only if every view's raw map
    ``(K, *grid)`` has its view's grid, the maps on the image ``(K, H, W)`` are at the
    original ``size``, there are ``tokens`` maps everywhere and none is vacuous
    (:func:`vacuous`); else ``error`` naming what is wrong."""
    if not grids:
        return "error", "no view of the image"
    for i, (grid_maps, grid) in enumerate(grids):
        shape = tuple(grid_maps.shape)
        if shape != (tokens, *grid):
            return "error", f"view {i}: maps {shape}, not {(tokens, *grid)}"
        fault = vacuous(grid_maps)
        if fault is not None:
            return "error", f"view {i}: {fault}"
    if tuple(maps.shape) != (tokens, *size):
        return "error", f"maps {tuple(maps.shape)} on the image, not {(tokens, *size)}"
    fault = vacuous(maps)
    if fault is not None:
        return "error", f"on the image: {fault}"
    views = ", ".join("×".join(map(str, g)) for _, g in grids)
    plural = "s" if len(grids) > 1 else ""
    where = f"{len(grids)} view{plural} ({views}) and the {size[0]}×{size[1]} image"
    return "works", f"{tokens} token maps on {where}"


def driven(model: Any, processor: Any) -> Tuple[str, str]:
    """Run a class described through views on its processor's inputs for :func:`test_image`
    (a 3-token answer): per view, ``AnswerLogits.view_maps``; on the image,
    ``LeGrad(...).attribute_multi(output="map")`` on the processor's canvas and
    ``explain_answer``'s maps at the original size; :func:`judge` gives the verdict."""
    from vlm_processors import image_placeholder

    from captum_legrad import AnswerLogits, LeGrad, UnsupportedModelError, explain_answer
    from captum_legrad.adapters.hf.vlm import describe

    image = test_image()
    prompt = f"a {image_placeholder(processor)} what is this ?"
    answer_text = "a b c"
    try:
        rules = describe(model).views
        assert rules is not None
        dtype = next(model.parameters()).dtype
        batch: Dict[str, Any] = {
            k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in processor(images=[image], text=[prompt], return_tensors="pt").items()
        }
        ids, mask = batch.pop("input_ids"), batch.pop("attention_mask", None)
        pixels = batch.pop(rules.main_input(batch))
        if "image_sizes" in rules.consumed and batch.get("image_sizes") is None:
            batch["image_sizes"] = torch.tensor([list(IMAGE_SIZE)])  # InternVL, Llama 4
        answer = processor.tokenizer(answer_text, add_special_tokens=False, return_tensors="pt")
        answer = answer["input_ids"]
        tokens = int(answer.shape[1])
        explained = AnswerLogits(model, ids, answer, mask, **batch)
        views = explained.views(pixels)[0].views
        grid_maps = explained.view_maps(pixels, targets=range(tokens))[0]
        grids = [(m, tuple(v.grid)) for m, v in zip(grid_maps, views)]
        canvas = LeGrad(explained).attribute_multi(
            pixels, targets=range(tokens), output="map", normalize=False
        )[0]
        fault = vacuous(canvas)
        if fault is not None:
            return "error", f"LeGrad's map: {fault}"
        result = explain_answer(model, processor, image, prompt, answer=answer_text)
    except UnsupportedModelError as error:
        return "refused", _reason(error)
    except Exception as error:
        return "error", f"{type(error).__name__}: {error}"[:300]
    return judge(grids, result.maps, IMAGE_SIZE, tokens)


def sweep(names: Optional[Sequence[str]] = None) -> List[Row]:
    rows: List[Row] = []
    for name in names or vlm_classes():
        start = time.perf_counter()
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            model, how = build(name)
            if model is None:
                rows.append((name, "skipped", "-", how))
                continue
            status, detail = check(name, model, how)
        rows.append((name, status, how.split(" ")[0], detail))
        del model
        seconds = time.perf_counter() - start
        print(f"{name}: {status} ({seconds:.1f} s)", file=sys.stderr)
    return rows


def markdown(rows: Sequence[Row]) -> str:
    """The rows as a Markdown table, with the counts below it."""
    import transformers

    lines = [
        "| class | status | built | detail |",
        "|---|---|---|---|",
        *(f"| `{n}` | {s} | {b} | {d.replace('|', '/')} |" for n, s, b, d in rows),
    ]
    counts: Dict[str, int] = {}
    for _, status, _, _ in rows:
        counts[status] = counts.get(status, 0) + 1
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    lines += ["", f"transformers {transformers.__version__}, torch {torch.__version__}: {summary}."]
    return "\n".join(lines)


PAGE_HEAD = """# Coverage: vision-language models (answer maps)

Every image-taking generation class of the installed transformers (the image-text-to-text,
multimodal-LM and Vision2Seq auto mappings), built at a tiny random-init configuration and
given to `AnswerLogits` (`docs/method.md`, "Vision-language models").

* **works**: `AnswerLogits` + `LeGrad` ran and gave a map per answer token (3 tokens), every
  one finite, not all zero and not constant. One fixed grid per image (LLaVA-1.5,
  PaliGemma, Gemma 3): on that grid. Qwen-VL: on the image's token grid, from the inputs its
  processor lays out (flattened patches, `image_grid_thw`, vision start/end tokens),
  written by hand. **The families described through views** (the `CLASSES` of every module
  of `VIEW_FAMILIES`: LLaVA-NeXT, LLaVA-OneVision, Idefics3, SmolVLM, Mistral 3, InternVL,
  Llama 4, Mllama) are driven through **their real processors**: the processor, image processor
  and video processor classes the auto mappings name for the model type, built offline
  from the tiny configuration by one generic builder (`benchmarks/vlm_processors.py`: a
  word-level tokenizer holding the special tokens the processor writes, the
  configuration's token ids set to them, the processor's sizes read from the configuration
  by name, a few checkpoint settings such as InternVL's tiling), on a non-square 200×300
  image. Such a row works only if every view's raw map (`AnswerLogits.view_maps`) has its
  view's grid, `LeGrad(...).attribute_multi(output="map")` is not vacuous and
  `explain_answer`'s maps are at the original 200×300 size, none vacuous; the detail lists
  the views' grids. Exactness against an independent oracle is tested in
  `tests/test_vlm.py`, `tests/test_vlm_tiles.py` and `tests/test_vlm_more.py`.
* **accepted**: `AnswerLogits` takes the class but the sweep cannot run it (its processor
  cannot be built offline; the reason is shown). None today.
* **refused**: `UnsupportedModelError`, the first clause of its message shown.
* **error**: anything else, or a vacuous map (none is allowed: issue #21).
* **skipped**: the class has no vision part (audio, speech, proteins).

*built*: `tiny` (the configuration shrunk generically: one layer per stack, widths 64, the
vision patch grid kept divisible by the model's pixel-shuffle factor), `meta` (the tiny
configuration did not build; the default configuration on the meta device, enough for the
refusal) or `stub` (no configuration builds offline: an instance of the class whose
`__init__` did not run, so only the refusal by class is checked). Random init leaves some
tensors all zero (projectors, gates, tables), which would make every image token alike and
the maps vacuous: for **every** class alike, each all-zero floating tensor of the tiny model
gets N(0, 0.02²) values before the check.

Regenerate (3 min 22 s, of which the sweep 190 s, on 2 CPU cores shared with other jobs;
SmolVLM's processor needs the `num2words` package: without it that row is accepted, naming
it):

```
PYTHONPATH=$PWD python benchmarks/coverage_vlm.py --markdown docs/coverage_vlm.md
```

"""


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="classes to sweep (default: all)")
    parser.add_argument("--markdown", type=Path, help="write the docs page here")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    start = time.perf_counter()
    rows = sweep(args.names)
    table = markdown(rows)
    print(table)
    if args.markdown is not None:
        args.markdown.write_text(PAGE_HEAD + table + "\n")
    print(f"\n({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return 0 if all(row[1] != "error" for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
