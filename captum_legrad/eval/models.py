"""Loading a model for the command line: ``default`` (the bundled shapes ViT) or
``FAMILY:NAME`` for every family of :data:`captum_legrad.families.FAMILIES` (``timm:NAME``,
``open_clip:NAME``, ``hf:PATH``, ``torchvision:NAME``), with local weights only.

Each loader returns a :class:`LoadedModel`: the module to explain (scores ``(B, K)``), the
input size and normalisation, class names when known, and for image-text models a way to
turn prompts into a model whose scores are the prompts' similarities.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = [
    "LoadedModel",
    "ModelError",
    "load_model",
    "load_weights",
    "model_choices",
    "load_timm",
    "load_open_clip",
    "load_hf",
    "load_torchvision",
]

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class ModelError(ValueError):
    """A model specification or weight file that cannot be used (bad name, path, extra)."""


@dataclass
class LoadedModel:
    """A model ready for explanation.

    Attributes:
        model: Returns scores ``(B, K)`` for normalised images.
        image_size: Input ``(H, W)``.
        mean, std: Per-channel normalisation of ``[0, 1]`` images.
        classes: Class names, when known.
        with_prompts: For image-text models, builds a model whose ``K`` scores are the
                    similarities with the given prompts (then targets index the prompts).
        multilabel: The classes are independent (sigmoid) rather than exclusive (softmax).
        patch_size: The ViT's patch size, for perturbation tests.
    """

    model: nn.Module
    image_size: Tuple[int, int]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    classes: Optional[List[str]] = None
    with_prompts: Optional[Callable[[Sequence[str]], nn.Module]] = None
    multilabel: bool = False
    patch_size: Tuple[int, int] = (16, 16)
    extra: Dict[str, Any] = field(default_factory=dict)

    def normalize(self, images: Tensor) -> Tensor:
        """``[0, 1]`` images → the model's input."""
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
        return (images - mean) / std


def load_weights(path: Path) -> Dict[str, Tensor]:
    """A state dict from ``.safetensors`` or a ``torch.save`` file (``weights_only=True``).

    Checkpoints that wrap the weights in ``state_dict`` / ``model`` / ``module`` entries, or
    prefix them with ``module.``, are unwrapped.
    """
    if not path.is_file():
        raise ModelError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path))
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as error:  # the unpickler's errors vary by torch version
            raise ModelError(f"cannot read weights from {path}: {error}") from error
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ModelError(f"{path} does not hold a state dict.")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, Tensor)}


def _load_into(model: nn.Module, path: Optional[Path], name: str) -> None:
    if path is None:
        return
    try:
        model.load_state_dict(load_weights(path))
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise ModelError(f"weights {path} do not fit {name}: {first}") from error


def _import(module: str, extra: str) -> Any:
    try:
        return __import__(module)
    except ImportError as error:
        raise ModelError(
            f"this model needs the {module} package: pip install 'captum-legrad[{extra}]'."
        ) from error


def _spatial_size(value: Any) -> Tuple[int, int]:
    """``(H, W)``: the last two entries of a size such as ``(3, H, W)``, or ``(s, s)``."""
    if isinstance(value, (tuple, list)):
        return int(value[-2]), int(value[-1])
    return int(value), int(value)


def _default(weights: Optional[Path]) -> LoadedModel:
    from ..data import default_model_config, load_default_model

    config = default_model_config()
    if weights is not None and not weights.is_file():
        raise ModelError(f"weights file not found: {weights}")
    model = load_default_model(weights)
    kwargs = config["model_kwargs"]
    return LoadedModel(
        model=model,
        image_size=_spatial_size(config["image_size"]),
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
        classes=list(config["classes"]),
        multilabel=bool(config.get("multilabel", False)),
        patch_size=_spatial_size(kwargs["patch_size"]),
    )


def load_timm(name: str, weights: Optional[Path], num_classes: Optional[int]) -> LoadedModel:
    """A timm model by name, with ``weights`` from a local file."""
    timm = _import("timm", "timm")
    kwargs: Dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as error:  # timm: "Unknown model (...)"
        raise ModelError(f"unknown timm model {name!r}: {error}") from error
    _load_into(model, weights, f"timm:{name}")
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", (16, 16))
    return LoadedModel(
        model=model.eval(),
        image_size=_spatial_size(cfg.get("input_size", (3, 224, 224))),
        mean=tuple(cfg.get("mean", _IMAGENET_MEAN)),
        std=tuple(cfg.get("std", _IMAGENET_STD)),
        patch_size=_spatial_size(patch),
    )


def load_open_clip(
    name: str, weights: Optional[Path], num_classes: Optional[int] = None
) -> LoadedModel:
    """An OpenCLIP model by config name, with ``weights`` from a local file."""
    if num_classes is not None:
        raise ModelError("--num-classes does not apply to open_clip models (prompts are classes).")
    open_clip = _import("open_clip", "open_clip")
    if name not in open_clip.list_models():
        raise ModelError(f"unknown open_clip model {name!r}; see open_clip.list_models().")
    model = open_clip.create_model(name, pretrained=None)
    _load_into(model, weights, f"open_clip:{name}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    visual: Any = model.visual
    cfg = getattr(visual, "preprocess_cfg", {}) or {}

    def with_prompts(prompts: Sequence[str]) -> nn.Module:
        from ..text import ImageTextSimilarity

        return ImageTextSimilarity.from_prompts(model, list(prompts), tokenizer)

    return LoadedModel(
        model=model,
        image_size=_spatial_size(getattr(visual, "image_size", 224)),
        mean=tuple(cfg.get("mean", _CLIP_MEAN)),
        std=tuple(cfg.get("std", _CLIP_STD)),
        with_prompts=with_prompts,
        patch_size=_spatial_size(getattr(visual, "patch_size", 16)),
    )


class _Logits(nn.Module):
    """An HF image classifier returning its logits tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        logits: Tensor = self.model(pixel_values=images).logits
        return logits


def load_hf(
    path_text: str, weights: Optional[Path] = None, num_classes: Optional[int] = None
) -> LoadedModel:
    """A transformers model from a local folder (``config.json`` and weights)."""
    if weights is not None:
        raise ModelError("hf:PATH loads the weights in the folder; drop --weights.")
    if num_classes is not None:
        raise ModelError("hf:PATH takes its classes from the folder's config; drop --num-classes.")
    path = Path(path_text)
    if not path.is_dir():
        raise ModelError(f"hf:PATH must be a local model folder (config.json): {path} not found")
    transformers = _import("transformers", "transformers")
    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    processor_file = path / "preprocessor_config.json"
    processor: Dict[str, Any] = (
        json.loads(processor_file.read_text()) if processor_file.is_file() else {}
    )
    mean = tuple(processor.get("image_mean", _IMAGENET_MEAN))
    std = tuple(processor.get("image_std", _IMAGENET_STD))
    if config.model_type in ("clip", "siglip"):
        model = transformers.AutoModel.from_pretrained(str(path), local_files_only=True).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        vision = config.vision_config

        def with_prompts(prompts: Sequence[str]) -> nn.Module:
            from ..text import ImageTextSimilarity

            return ImageTextSimilarity.from_prompts(model, list(prompts), tokenizer)

        return LoadedModel(
            model=model,
            image_size=_spatial_size(vision.image_size),
            mean=mean,
            std=std,
            with_prompts=with_prompts,
            patch_size=_spatial_size(vision.patch_size),
        )
    model = transformers.AutoModelForImageClassification.from_pretrained(
        str(path), local_files_only=True
    ).eval()
    labels = getattr(config, "id2label", None) or {}
    return LoadedModel(
        model=_Logits(model).eval(),
        image_size=_spatial_size(getattr(config, "image_size", 224)),
        mean=mean,
        std=std,
        classes=[labels[i] for i in sorted(labels)] if labels else None,
        patch_size=_spatial_size(getattr(config, "patch_size", 16)),
    )


def load_torchvision(
    name: str, weights: Optional[Path], num_classes: Optional[int] = None
) -> LoadedModel:
    """A torchvision ViT by builder name (``vit_b_16``), with ``weights`` from a local file."""
    torchvision = _import("torchvision", "torchvision")
    from torchvision.models.vision_transformer import VisionTransformer

    kwargs: Dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    try:
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    except ValueError as error:  # "Unknown model name"
        raise ModelError(f"unknown torchvision model {name!r}: {error}") from error
    if not isinstance(model, VisionTransformer):
        raise ModelError(
            f"torchvision:{name} is not a VisionTransformer; LeGrad explains the vit_* models."
        )
    _load_into(model, weights, f"torchvision:{name}")
    return LoadedModel(
        model=model.eval(),
        image_size=_spatial_size(model.image_size),
        mean=_IMAGENET_MEAN,
        std=_IMAGENET_STD,
        patch_size=_spatial_size(model.patch_size),
    )


def model_choices() -> str:
    """What ``--model`` accepts, from the family registry."""
    from ..families import FAMILIES

    names = [f"{row.name}:{row.name_hint}" for row in FAMILIES if row.loader is not None]
    return "default | " + " | ".join(names)


def load_model(
    spec: str, weights: Optional[Path] = None, num_classes: Optional[int] = None
) -> LoadedModel:
    """Load ``default`` or ``FAMILY:NAME`` (see :func:`model_choices`) without network access.

    The loader of each family is named in its :data:`~captum_legrad.families.FAMILIES` row.

    Raises:
        ModelError: An unknown specification or model name, a missing weights file, weights
            that do not fit, or a missing optional dependency (naming the extra).
    """
    from ..families import family

    if spec == "default":
        if num_classes is not None:
            raise ModelError(
                "--model default is the bundled shapes model with its own classes; "
                "drop --num-classes."
            )
        return _default(weights)
    prefix, colon, name = spec.partition(":")
    if not colon or not name:
        raise ModelError(f"unknown model {spec!r}: use {model_choices()}.")
    try:
        row = family(prefix)
    except KeyError:
        row = None
    if row is None or row.loader is None:
        raise ModelError(f"unknown model family {prefix!r} in {spec!r}: use {model_choices()}.")
    module_name, _, function = row.loader.partition(":")
    loader = getattr(importlib.import_module(module_name), function)
    loaded: LoadedModel = loader(name, weights, num_classes)
    return loaded
