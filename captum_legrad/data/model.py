"""The bundled default model: a tiny timm ViT trained on the shapes dataset.

The weights (``default_model.safetensors``) and their configuration
(``default_model.json``: architecture, constructor arguments, class names, input
normalisation, training settings and held-out metrics) are package data, written by
``scripts/train_default_model.py``. Loading needs no network: the model is built with
``timm.create_model(..., pretrained=False)`` and the weights come from the package.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from torch import Tensor, nn

__all__ = [
    "DEFAULT_WEIGHTS",
    "DEFAULT_CONFIG",
    "default_model_config",
    "build_model",
    "load_default_model",
    "normalize",
    "denormalize",
]

_HERE = Path(__file__).resolve().parent
#: Path of the bundled weights (safetensors).
DEFAULT_WEIGHTS = _HERE / "default_model.safetensors"
#: Path of the bundled configuration (JSON).
DEFAULT_CONFIG = _HERE / "default_model.json"


def default_model_config(path: Union[str, Path, None] = None) -> Dict[str, Any]:
    """The bundled model's configuration (or the JSON file at ``path``) as a dict."""
    with open(DEFAULT_CONFIG if path is None else path, encoding="utf-8") as handle:
        config: Dict[str, Any] = json.load(handle)
    return config


def build_model(config: Dict[str, Any]) -> nn.Module:
    """Build the (randomly initialised) timm model a configuration describes."""
    try:
        import timm
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The default model is a timm ViT: install the extra with "
            "`pip install captum-legrad[timm]`."
        ) from error
    model: nn.Module = timm.create_model(
        config["architecture"], pretrained=False, **config["model_kwargs"]
    )
    return model


def load_default_model(
    weights: Union[str, Path, None] = None, config: Optional[Dict[str, Any]] = None
) -> nn.Module:
    """Load the bundled shapes ViT, in eval mode, without network access.

    Args:
        weights (str or Path, optional): A safetensors file to load instead of the bundled
                    weights (e.g. one just written by the training script).
                    Default: None
        config (dict, optional): The configuration to build the model from.
                    Default: None (the bundled ``default_model.json``)

    Returns:
        A timm ``VisionTransformer`` taking normalised ``(B, 3, 64, 64)`` images (see
        :func:`normalize`) and returning ``(B, 5)`` logits, one per class of
        :data:`~captum_legrad.data.CLASSES` (multi-label: a logit above 0 means the class
        is present).

    Examples::

        >>> from captum_legrad.data import ShapesDataset, load_default_model, normalize
        >>> model = load_default_model()
        >>> batch = ShapesDataset(4).batch(range(4))
        >>> logits = model(normalize(batch.images))  # (4, 5)
    """
    from safetensors.torch import load_file

    config = default_model_config() if config is None else config
    model = build_model(config)
    state = load_file(str(DEFAULT_WEIGHTS if weights is None else weights))
    reference = model.state_dict()
    state = {name: value.to(reference[name].dtype) for name, value in state.items()}
    model.load_state_dict(state)
    return model.eval()


def normalize(images: Tensor, config: Optional[Dict[str, Any]] = None) -> Tensor:
    """``[0, 1]`` RGB images → the model's input, ``(x - mean) / std`` per channel."""
    config = default_model_config() if config is None else config
    mean = torch.tensor(config["mean"], dtype=images.dtype, device=images.device)
    std = torch.tensor(config["std"], dtype=images.dtype, device=images.device)
    return (images - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)


def denormalize(images: Tensor, config: Optional[Dict[str, Any]] = None) -> Tensor:
    """Inverse of :func:`normalize`, clipped to ``[0, 1]``."""
    config = default_model_config() if config is None else config
    mean = torch.tensor(config["mean"], dtype=images.dtype, device=images.device)
    std = torch.tensor(config["std"], dtype=images.dtype, device=images.device)
    return (images * std.view(-1, 1, 1) + mean.view(-1, 1, 1)).clamp(0, 1)
