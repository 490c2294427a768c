"""Offline processors for the vision-language models of the installed ``transformers``.

A VLM's inputs (tiles, crops, ``image_sizes``, row and separator tokens) are laid out by its
processor. :func:`offline_processor` builds the **family's real processor classes** (the
processor, image processor and video processor that the auto mappings name for the
configuration's ``model_type``) without downloading anything, consistent with a given
(tiny, random-init) configuration:

* the tokenizer is a word-level one (:func:`offline_tokenizer`) whose vocabulary holds a few
  words and every special token the processor writes (read from the processor's own
  ``*_token`` attributes and from the text it expands an image placeholder into);
* the configuration's token ids (``<name>_token_id`` / ``<name>_token_index``) are set to the
  tokenizer's ids of the processor's ``<name>_token`` strings;
* the processor's and image processor's settings are read from the configuration by name
  (``patch_size``, ``spatial_merge_size``, ``vision_feature_select_strategy``,
  ``image_grid_pinpoints``, ...); the image processor's tile is the vision tower's
  ``image_size`` (its ``size`` / ``crop_size`` / ``max_image_size`` scaled to it); the
  number of tokens per tile (``image_seq_len``, ``num_image_tokens``) is the vision grid
  after the configuration's merge (``scale_factor``, ``downsample_ratio``);
* :data:`CHECKPOINT_SETTINGS` holds the few settings a released checkpoint's processor
  configuration carries that neither the class defaults nor the model configuration give.

Nothing here imports the tests, and the tests may import it (``benchmarks/`` on the path).
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = [
    "WORDS",
    "CHECKPOINT_SETTINGS",
    "offline_tokenizer",
    "processor_classes",
    "offline_processor",
    "image_placeholder",
]

#: Plain words of the tiny vocabulary (ids 0.. in this order).
WORDS = ["<unk>", "<pad>", "<s>", "</s>", "a", "b", "c", "what", "is", "this", "?"]

#: Settings a released checkpoint's processor configuration holds that neither the class
#: defaults nor the model configuration give, by ``model_type``: ``processor`` and
#: ``image_processor`` keyword arguments, ``tokenizer`` named special tokens.
CHECKPOINT_SETTINGS: Dict[str, Dict[str, Dict[str, Any]]] = {
    # InternVL3-*-hf: the image is cut into tiles (GotOcr2ImageProcessor's default is off);
    # its processor reads the image tokens from the tokenizer's named special tokens.
    "internvl": {
        "image_processor": {"crop_to_patches": True},
        "tokenizer": {
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
    },
}

#: Special-token patterns in a processor's expanded text: <...>, <|...|>, [UPPER_CASE], \n.
_SPECIAL = re.compile(r"<\|[^|<>]*\|>|</?[A-Za-z_][^<>\s]*>|\[[A-Z_]+\]|\n")


def offline_tokenizer(specials: Sequence[str] = (), named: Optional[Dict[str, str]] = None) -> Any:
    """A word-level fast tokenizer over :data:`WORDS` and ``specials`` (added as special
    tokens, so they are matched whole wherever they appear), with ``named`` special tokens
    as attributes (``tokenizer.<name>``, ``tokenizer.<name>_id``, as a checkpoint's
    tokenizer configuration names them); nothing is downloaded."""
    named = dict(named or {})
    specials = [*specials, *named.values()]
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = [s for s in dict.fromkeys(specials) if s not in WORDS]
    vocab = {w: i for i, w in enumerate([*WORDS, *specials])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens=named,
    )
    if specials:
        fast.add_special_tokens({"additional_special_tokens": list(specials)})
    fast.padding_side = "left"
    return fast


def _class(value: Any) -> Optional[type]:
    """The transformers class an auto mapping names (the torchvision one first)."""
    import transformers

    if isinstance(value, dict):
        value = value.get("torchvision") or value.get("pil") or next(iter(value.values()), None)
    if isinstance(value, (tuple, list)):
        value = next((v for v in reversed(value) if v), None)
    return None if value is None else getattr(transformers, str(value), None)


def processor_classes(model_type: str) -> Tuple[Optional[type], Optional[type], Optional[type]]:
    """(processor, image processor, video processor) classes the auto mappings name for
    ``model_type`` (None where a mapping names none)."""
    from transformers.models.auto import image_processing_auto, processing_auto

    try:
        from transformers.models.auto import video_processing_auto

        videos = getattr(video_processing_auto, "VIDEO_PROCESSOR_MAPPING_NAMES", {})
    except ImportError:  # releases without video processors
        videos = {}
    return (
        _class(processing_auto.PROCESSOR_MAPPING_NAMES.get(model_type)),
        _class(image_processing_auto.IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type)),
        _class(videos.get(model_type)),
    )


def _parts(config: Any) -> List[Any]:
    """``config``, then its vision configuration, then the other nested ones."""
    from transformers import PretrainedConfig

    nested = [v for v in vars(config).values() if isinstance(v, PretrainedConfig)]
    vision = getattr(config, "vision_config", None)
    return [config, *([vision] if vision is not None else []), *nested]


def _lookup(config: Any, name: str) -> Any:
    for part in _parts(config):
        value = getattr(part, name, None)
        if value is not None:
            return value
    return None


def _int(value: Any) -> int:
    return int(value[0] if isinstance(value, (tuple, list)) else value)


def tile_side(config: Any) -> int:
    """The vision tower's input side in pixels (its ``image_size``)."""
    return _int(config.vision_config.image_size)


def tokens_per_tile(config: Any) -> int:
    """Image tokens one tile gives: the vision patch grid after the configuration's merge
    (``scale_factor`` pixel shuffle, ``downsample_ratio``)."""
    vision = config.vision_config
    side = tile_side(config) // _int(vision.patch_size)
    scale = getattr(config, "scale_factor", None)
    if isinstance(scale, int) and scale > 1:
        side //= scale
    ratio = getattr(config, "downsample_ratio", None)
    if isinstance(ratio, float):
        side = int(side * ratio)
    return side * side


def _processor_settings(cls: Any, config: Any) -> Dict[str, Any]:
    """The processor's keyword arguments read from ``config`` by name."""
    found: Dict[str, Any] = {}
    for name in inspect.signature(cls.__init__).parameters:
        if name in ("self", "image_processor", "tokenizer", "video_processor", "chat_template"):
            continue
        if name in ("image_seq_len", "image_seq_length", "num_image_tokens"):
            found[name] = tokens_per_tile(config)
        elif name == "num_additional_image_tokens":
            # the "default" feature strategy drops the tower's CLS token: there is one
            found[name] = int(_lookup(config, "vision_feature_select_strategy") == "default")
        elif name == "patch_size":
            found[name] = _int(config.vision_config.patch_size)
        elif not name.endswith("_token") and _lookup(config, name) is not None:
            found[name] = _lookup(config, name)
    return found


def _image_settings(cls: Any, config: Any) -> Dict[str, Any]:
    """The image processor's keyword arguments: its tile scaled to the vision tower's
    ``image_size``, the patch size and grid pinpoints read from ``config``."""
    defaults = cls().to_dict()
    side = tile_side(config)
    found: Dict[str, Any] = {}
    size = dict(defaults.get("size") or {})
    largest = defaults.get("max_image_size")
    if largest:  # tiles of max_image_size cut from an image resized to size's longest edge
        scale = side / int(largest["longest_edge"])
        found["max_image_size"] = {"longest_edge": side}
        found["size"] = {"longest_edge": round(size["longest_edge"] * scale)}
    elif "height" in size:
        found["size"] = {"height": side, "width": side}
    elif "shortest_edge" in size:
        found["size"] = {"shortest_edge": side}
    elif "longest_edge" in size:
        found["size"] = {"longest_edge": side}
    if "height" in (defaults.get("crop_size") or {}):
        found["crop_size"] = {"height": side, "width": side}
    if isinstance(defaults.get("patch_size"), dict):
        patch = _int(config.vision_config.patch_size)
        found["patch_size"] = {"height": patch, "width": patch}
    pinpoints = _lookup(config, "image_grid_pinpoints")
    if pinpoints is not None and "image_grid_pinpoints" in defaults:
        found["image_grid_pinpoints"] = pinpoints
    return found


def _build(classes: Tuple[Any, Any, Any], config: Any, tokenizer: Any, settings: Dict) -> Any:
    processor_cls, image_cls, video_cls = classes
    assert processor_cls is not None and image_cls is not None
    image = image_cls(
        **{**_image_settings(image_cls, config), **settings.get("image_processor", {})}
    )
    kwargs = {**_processor_settings(processor_cls, config), **settings.get("processor", {})}
    params = inspect.signature(processor_cls.__init__).parameters
    if "video_processor" in params:
        kwargs["video_processor"] = None if video_cls is None else video_cls()
    return processor_cls(image_processor=image, tokenizer=tokenizer, **kwargs)


def image_placeholder(processor: Any) -> str:
    """The text a prompt holds where the image goes."""
    for name in ("image_token", "fake_image_token"):
        value = getattr(processor, name, None)
        token = getattr(value, "content", value)
        if isinstance(token, str):
            return token
    raise ValueError(f"{type(processor).__name__} names no image token")


def _expanded(processor: Any, image: Any) -> List[str]:
    """The texts the processor hands its tokenizer for one image's prompt (the image
    placeholder expanded into the family's image, row and separator tokens)."""
    seen: List[str] = []
    tokenizer = processor.tokenizer
    original = type(tokenizer).__call__

    def record(self: Any, text: Any = None, *args: Any, **kwargs: Any) -> Any:
        seen.extend([text] if isinstance(text, str) else list(text or []))
        return original(self, text, *args, **kwargs)

    type(tokenizer).__call__ = record
    try:  # the draft tokenizer lacks the special tokens: its own count check may fail
        processor(images=[image], text=[f"a {image_placeholder(processor)} b"], return_tensors="pt")
    except ValueError:
        pass
    finally:
        type(tokenizer).__call__ = original
    return seen


def _specials(processor: Any, expanded: Sequence[str]) -> List[str]:
    """Every special token the processor writes: its ``*_token`` attributes and the special
    tokens of its expanded text."""
    found = []
    for name, value in vars(processor).items():
        token = getattr(value, "content", value)
        if name.endswith("_token") and isinstance(token, str):
            found.append(token)
    for text in expanded:
        found += _SPECIAL.findall(text)
    return list(dict.fromkeys(found))


def _image_feature_token(expanded: Sequence[str]) -> Optional[str]:
    """The token the model puts the image features at: the special token the processor
    repeats most for one image (``<image>``, ``[IMG]``, ``<IMG_CONTEXT>``, ``<|patch|>``)."""
    counts: Dict[str, int] = {}
    for text in expanded:
        for token in _SPECIAL.findall(text):
            if token != "\n":
                counts[token] = counts.get(token, 0) + 1
    return max(counts, key=lambda t: counts[t]) if counts else None


#: Begin / end of image: a configuration's ``boi`` / ``eoi`` ids and the processor's names.
_BOUNDS = {
    "boi": re.compile(r"(boi|(start|begin)_(of_)?im(g|age)|im(g|age)_(start|begin))_token"),
    "eoi": re.compile(r"(eoi|end_(of_)?im(g|age)|im(g|age)_end)_token"),
}


def _named_token(processor: Any, name: str) -> Optional[str]:
    """The processor's ``<name>_token`` string (for ``boi`` / ``eoi``: its begin / end of
    image token, whatever the processor calls it)."""
    for attr, value in vars(processor).items():
        token = getattr(value, "content", value)
        if not isinstance(token, str):
            continue
        if attr == f"{name}_token" or (name in _BOUNDS and _BOUNDS[name].fullmatch(attr)):
            return token
    return None


def offline_processor(config: Any, image: Any, settings: Optional[Dict] = None) -> Any:
    """The real processor of ``config``'s family, built offline and consistent with it;
    ``config``'s token ids are set to the tokenizer's (before the model is built).

    Args:
        config (PretrainedConfig): The model's configuration (changed in place: its image,
                    video and other ``*_token_id`` / ``*_token_index`` ids).
        image (Any): A sample image (PIL, array or tensor), expanded once to read which
                    special tokens the processor writes.
        settings (dict, optional): ``{"processor": {...}, "image_processor": {...}}``
                    overrides. Default: :data:`CHECKPOINT_SETTINGS` of the model type.

    Returns:
        The processor (its tokenizer: :func:`offline_tokenizer`).

    Raises:
        ValueError: The auto mappings name no processor or image processor for the type.
    """
    model_type = str(config.model_type)
    classes = processor_classes(model_type)
    if classes[0] is None or classes[1] is None:
        raise ValueError(f"transformers names no processor and image processor for {model_type}")
    settings = CHECKPOINT_SETTINGS.get(model_type, {}) if settings is None else settings
    named = settings.get("tokenizer", {})
    draft = _build(classes, config, offline_tokenizer((), named), settings)
    expanded = _expanded(draft, image)
    tokenizer = offline_tokenizer(_specials(draft, expanded), named)
    processor = _build(classes, config, tokenizer, settings)
    vocab = tokenizer.get_vocab()
    for part in _parts(config):
        for key in list(vars(part)):
            match = re.fullmatch(r"(\w+)_token_(?:id|index)", key)
            if match is None:
                continue
            if match.group(1) == "image":
                token: Any = _image_feature_token(expanded)
            else:
                token = _named_token(processor, match.group(1))
            if isinstance(token, str) and token in vocab:
                setattr(part, key, int(vocab[token]))
    return processor
