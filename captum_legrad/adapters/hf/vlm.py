"""Hugging Face vision-language models: where the language model's pieces are.

:func:`describe` recognises the supported VLMs and returns a :class:`VLMParts`: the
language model's decoder layers (LeGrad's blocks) and their attention modules, the final
norm and ``lm_head`` (the logit-lens readout), the image-token id, and the rule from an
image's size to the image-token grid. :class:`~captum_legrad.AnswerLogits` turns it
into a :class:`~captum_legrad.ViTSpec`. Supported, one image per sample at the model's
fixed resolution:

* ``LlavaForConditionalGeneration`` with a CLIP or SigLIP vision tower (LLaVA-1.5 layout:
  the image tokens are the vision patches, without CLS under the ``"default"`` feature
  strategy; with ``"full"`` the first image token, CLS, is not a patch);
* ``PaliGemmaForConditionalGeneration`` (PaliGemma 1 and 2): the SigLIP patches;
* ``Gemma3ForConditionalGeneration``: the SigLIP patches average-pooled by ``k × k``
  (``k = 4`` for the released models), so the map lives on the pooled token grid.

Families whose image tokens are not one fixed grid per sample are described through views
(:mod:`captum_legrad.views`; ``VLMParts.views``), one module per family, registered in one
table, :data:`VIEW_FAMILIES`:

* Qwen2-VL, Qwen2.5-VL, Qwen3-VL (:mod:`.vlm_qwen`): dynamic resolution, several images and
  videos per sample;
* LLaVA-NeXT and LLaVA-OneVision (:mod:`.vlm_llava_next`): AnyRes, a base view and the
  unpadded crops per image;
* Idefics3 and SmolVLM (:mod:`.vlm_idefics3`): tiles and the global image, pixel shuffle;
* Mistral 3 (:mod:`.vlm_mistral3`): Pixtral's rows, the 2×2 patch merger;
* InternVL (:mod:`.vlm_internvl`): dynamic tiles and a thumbnail;
* Gemma 4 (:mod:`.vlm_gemma4`): one pooled patch grid per image;
* Llama 4 (:mod:`.vlm_llama4`): tiles of a padded canvas and a global view;
* Mllama, Llama 3.2 Vision (:mod:`.vlm_mllama`): tiles of a padded canvas read through
  **cross-attention**: its blocks are the cross-attention decoder layers (the module's
  ``ATTENTION`` names their attention, ``cross_attn``) and its views' positions index
  those layers' vision keys (``ViewRules.cross_keys``), not the sequence.

Each of these modules exposes ``CLASSES``, ``rules(config)`` and ``token_step(config)``
(and ``language_parts(model)`` where the model has no base model or its blocks are a
subset of the decoder layers); :func:`describe` takes
one path for all of them. :mod:`.vlm_tiles` holds what the tiled families share (the view
records, their conversion to :class:`~captum_legrad.views.SampleViews`, the run and
rectangle helpers). The other tiled or multi-crop models are refused with
:class:`~captum_legrad.UnsupportedModelError` naming why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple, cast

from torch import nn

from ...errors import UnsupportedModelError
from ...views import ViewRules
from . import (
    vlm_gemma4,
    vlm_idefics3,
    vlm_internvl,
    vlm_llama4,
    vlm_llava_next,
    vlm_mistral3,
    vlm_mllama,
    vlm_qwen,
)

__all__ = ["VLMParts", "describe", "SUPPORTED", "REFUSED"]

#: The families described through views, one module each. Every module exposes the same
#: interface: ``CLASSES`` (the class names it describes), ``rules(config)`` (its
#: :class:`~captum_legrad.views.ViewRules`) and ``token_step(config)`` (the pixels one
#: token covers per side, ``VLMParts.pixels_per_token``); a module whose model has no base
#: model (Llama 4) or whose blocks are not all decoder layers (Mllama) also gives
#: ``language_parts(model)`` → ``(inner, layers, norm, lm_head)``, and one whose blocks'
#: attention is not ``self_attn`` names it in ``ATTENTION`` (Mllama: ``"cross_attn"``).
VIEW_FAMILIES: Tuple[Any, ...] = (
    vlm_qwen,
    vlm_llava_next,
    vlm_idefics3,
    vlm_mistral3,
    vlm_internvl,
    vlm_gemma4,
    vlm_llama4,
    vlm_mllama,
)

#: Class name -> the module of :data:`VIEW_FAMILIES` that describes it.
_VIEW_MODULES: Dict[str, Any] = {
    name: module for module in VIEW_FAMILIES for name in module.CLASSES
}

#: Class names of the supported models.
SUPPORTED = (
    "LlavaForConditionalGeneration",
    "PaliGemmaForConditionalGeneration",
    "Gemma3ForConditionalGeneration",
    *_VIEW_MODULES,
)

#: Class names refused with a reason: tiled or dynamic-resolution image tokens.
REFUSED = {
    "LlavaNextVideoForConditionalGeneration": "tiles the image and adds video frames",
    "Idefics2ForConditionalGeneration": "splits the image and resamples it with a perceiver",
    "Qwen3_5ForConditionalGeneration": (
        "has a hybrid language model (Gated DeltaNet linear-attention layers between the "
        "softmax attention layers: no attention probabilities over the image tokens there)"
    ),
    "Qwen3_5MoeForConditionalGeneration": (
        "has a hybrid language model (Gated DeltaNet linear-attention layers between the "
        "softmax attention layers: no attention probabilities over the image tokens there)"
    ),
    "Gemma3nForConditionalGeneration": "has an audio-vision encoder without a patch grid",
}

_VISION_TOWERS = ("clip_vision_model", "siglip_vision_model")

# Families whose image tokens cannot be mapped back to the image honestly: each image token
# is a learned query (or latent) that mixes every patch, so no token belongs to a place.
REFUSED.update(
    {
        "Blip2ForConditionalGeneration": (
            "reads the image through a Q-Former's learned queries, each a mix of every patch"
        ),
        "InstructBlipForConditionalGeneration": (
            "reads the image through a Q-Former's learned queries, each a mix of every patch"
        ),
        "InstructBlipVideoForConditionalGeneration": (
            "reads the frames through a Q-Former's learned queries, each a mix of every patch"
        ),
        "IdeficsForVisionText2Text": (
            "resamples the image with a perceiver and reads it through cross-attention"
        ),
        "Kosmos2ForConditionalGeneration": (
            "resamples the image into latent queries, each a mix of every patch"
        ),
        "AriaForConditionalGeneration": (
            "resamples the image with learned queries (cross-attention projector)"
        ),
    }
)


@dataclass(frozen=True)
class VLMParts:
    """The parts of a vision-language model that LeGrad needs.

    Attributes:
        family: The model's class name.
        model: The ``…ForConditionalGeneration`` model.
        inner: Its base model (``model.model``), whose forward returns the language
            model's last hidden state (after the final norm).
        layers: The language model's decoder layers (LeGrad's blocks).
        attentions: Each layer's attention module.
        norm: The language model's final norm.
        lm_head: The output projection to the vocabulary.
        softcap: Final-logit soft-capping (``c · tanh(x / c)``) the model applies, or None.
        image_token_id: The placeholder id whose positions receive the image tokens.
        grid: Image size ``(H, W)`` → image-token grid ``(g_h, g_w)``.
        pixels_per_token: ``(p_h, p_w)``: the pixels one image token covers.
        tokens_per_image: ``g_h · g_w`` plus the image tokens that are not patches.
        skip_tokens: Leading image tokens of each image that are not patches (CLS).
        answer_type_id: ``token_type_ids`` value of answer tokens, for models whose
            attention mask reads token types (PaliGemma: 1, the causal suffix; Gemma 3:
            0, text); None for models without token types.
        prompt_type_ids: Rule building the prompt's ``token_type_ids`` from ``input_ids``
            as the model's processor does, or None.
        views: For families whose image tokens are not one fixed grid per sample (several
            images, dynamic resolution, tiles, video): the family's
            :class:`~captum_legrad.views.ViewRules`; ``grid``, ``tokens_per_image`` and
            ``skip_tokens`` are then unused. None: one image per sample on ``grid``.
    """

    family: str
    model: nn.Module
    inner: nn.Module
    layers: Tuple[nn.Module, ...]
    attentions: Tuple[nn.Module, ...]
    norm: nn.Module
    lm_head: nn.Module
    softcap: Optional[float]
    image_token_id: int
    grid: Callable[[int, int], Tuple[int, int]]
    pixels_per_token: Tuple[int, int]
    tokens_per_image: int
    skip_tokens: int
    answer_type_id: Optional[int]
    prompt_type_ids: Optional[Callable[[Any], Any]]
    views: Optional[ViewRules] = None


def _refuse(model: nn.Module, reason: str) -> UnsupportedModelError:
    why = "" if "language model" in reason else ", so its image tokens are not one patch grid"
    return UnsupportedModelError(
        f"{type(model).__name__} {reason}{why}; "
        f"LeGrad's answer maps support {', '.join(SUPPORTED)}. For another VLM, build a "
        "ViTSpec whose layout rule gives the image-token positions and grid."
    )


def _language_parts(model: Any) -> Tuple[Tuple[nn.Module, ...], nn.Module]:
    inner = model.model
    language = getattr(inner, "language_model", None) or inner.text_model  # Idefics3
    return tuple(language.layers), language.norm


def _square(size: Any) -> Tuple[int, int]:
    if isinstance(size, (tuple, list)):
        return int(size[0]), int(size[1])
    return int(size), int(size)


def describe(model: nn.Module) -> VLMParts:
    """The :class:`VLMParts` of a supported vision-language model.

    Raises:
        UnsupportedModelError: ``model`` is not one of :data:`SUPPORTED` (tiled and
            dynamic-resolution VLMs are named with the reason), or its vision tower is not
            a plain patch ViT.
    """
    name = type(model).__name__
    if name in REFUSED:
        raise _refuse(model, REFUSED[name])
    if name not in SUPPORTED:
        raise UnsupportedModelError(
            f"{name} is not a supported vision-language model: LeGrad's answer maps support "
            f"{', '.join(SUPPORTED)} from transformers (the …ForConditionalGeneration class, "
            "with its lm_head). Pass one of these, or describe another VLM with a ViTSpec."
        )
    m: Any = model
    if getattr(getattr(m, "config", None), "vision_config", False) is None:
        raise UnsupportedModelError(
            f"{name} was built without a vision part (its config's vision_config is None), "
            "so it takes no image and its answer has no image map: load a checkpoint whose "
            "configuration has a vision_config."
        )
    module = _VIEW_MODULES.get(name)
    if module is not None and hasattr(module, "language_parts"):
        return _view_family(model, module)
    base = getattr(m, "model", None)
    language = getattr(base, "language_model", None) or getattr(base, "text_model", None)
    if not isinstance(language, nn.Module):
        import transformers

        raise UnsupportedModelError(
            f"{name} of transformers {transformers.__version__} has the layout before "
            "transformers 4.52: no base model (model.model with vision_tower, "
            "multi_modal_projector and language_model), and older releases expand the image "
            "placeholder inside the forward, so the image-token positions are not in the "
            "prompt. LeGrad's answer maps need transformers >= 4.52: upgrade transformers."
        )
    config = m.config
    vision = config.vision_config
    layers, norm = _language_parts(m)
    attentions = tuple(cast(nn.Module, layer.self_attn) for layer in layers)
    if module is not None:
        return _view_family(model, module)
    patch = _square(vision.patch_size)
    side = _square(vision.image_size)
    if vision.model_type not in _VISION_TOWERS:
        raise _refuse(model, f"has a {vision.model_type} vision tower")

    def patch_grid(height: int, width: int) -> Tuple[int, int]:
        return height // patch[0], width // patch[1]

    n_patches = (side[0] // patch[0]) * (side[1] // patch[1])
    if name == "LlavaForConditionalGeneration":
        strategy = config.vision_feature_select_strategy
        if strategy not in ("default", "full"):
            raise _refuse(model, f"selects vision features with {strategy!r}")
        skip = 1 if strategy == "full" and vision.model_type == "clip_vision_model" else 0
        return VLMParts(
            name, model, m.model, layers, attentions, norm, m.lm_head, None,
            int(config.image_token_id), patch_grid, patch, n_patches + skip, skip, None, None,
        )  # fmt: skip
    text = config.get_text_config()
    softcap = getattr(text, "final_logit_softcapping", None)
    image_id = int(config.image_token_id)
    if name == "PaliGemmaForConditionalGeneration":
        return VLMParts(
            name, model, m.model, layers, attentions, norm, m.lm_head,
            None if softcap is None else float(softcap), image_id, patch_grid, patch,
            n_patches, 0, 1, lambda ids: ids.new_zeros(ids.shape),
        )  # fmt: skip
    # Gemma 3: the patch grid is average-pooled to tokens_per_side² tokens.
    tokens_side = round(int(config.mm_tokens_per_image) ** 0.5)
    kernel = (side[0] // patch[0]) // tokens_side
    if kernel < 1 or kernel * tokens_side != side[0] // patch[0]:
        raise _refuse(
            model,
            f"pools its {side[0] // patch[0]}-patch side to {tokens_side} tokens "
            "(mm_tokens_per_image), not an integer kernel",
        )
    pooled = (patch[0] * kernel, patch[1] * kernel)

    def pooled_grid(height: int, width: int) -> Tuple[int, int]:
        return height // pooled[0], width // pooled[1]

    return VLMParts(
        name, model, m.model, layers, attentions, norm, m.lm_head,
        None, image_id, pooled_grid, pooled, tokens_side * tokens_side, 0, 0,
        lambda ids: (ids == image_id).long(),
    )  # fmt: skip


def _view_family(model: nn.Module, module: Any) -> VLMParts:
    """The parts of a family of :data:`VIEW_FAMILIES`: the language model's pieces and the
    family module's view rules."""
    m: Any = model
    config = m.config
    name = type(model).__name__
    vision = config.vision_config
    strategy = getattr(config, "vision_feature_select_strategy", None)
    if strategy == "full" and getattr(vision, "model_type", None) == "clip_vision_model":
        raise _refuse(model, "keeps CLIP's CLS token in every crop (strategy 'full')")
    rules = module.rules(config)
    if hasattr(module, "language_parts"):
        inner, layers, norm, head = module.language_parts(model)
    else:
        inner = m.model
        layers, norm = _language_parts(m)
        head = m.lm_head
    step = int(module.token_step(config))
    attention = getattr(module, "ATTENTION", "self_attn")  # Mllama: the cross-attention
    attentions = tuple(cast(nn.Module, getattr(layer, attention)) for layer in layers)
    softcap = getattr(config.get_text_config(), "final_logit_softcapping", None)

    def token_grid(height: int, width: int) -> Tuple[int, int]:
        return height // step, width // step

    return VLMParts(
        name, model, inner, layers, attentions, norm, head,
        None if softcap is None else float(softcap), int(config.image_token_id), token_grid,
        (step, step), 0, 0, None, None, rules,
    )  # fmt: skip
