"""captum_legrad: LeGrad (arXiv 2404.03214) for Vision Transformers as a Captum attribution.

>>> from captum_legrad import LeGrad
>>> attr = LeGrad(model).attribute(images, target=labels)  # doctest: +SKIP
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .attribution import LeGrad
    from .discovery import discover
    from .errors import CaptureError, TargetError, UnsupportedModelError
    from .spec import PatchLayout, TokenInput, ViTSpec
    from .text import ImageTextSimilarity
    from .vlm import AnswerLogits

# The names are imported on first use (PEP 562), so that ``import captum_legrad.cli`` (and
# ``captum-legrad --help``) does not import torch.
_EXPORTS = {
    "LeGrad": "attribution",
    "discover": "discovery",
    "CaptureError": "errors",
    "TargetError": "errors",
    "UnsupportedModelError": "errors",
    "PatchLayout": "spec",
    "TokenInput": "spec",
    "ViTSpec": "spec",
    "ImageTextSimilarity": "text",
    "AnswerLogits": "vlm",
}

__all__ = [
    "LeGrad",
    "discover",
    "ViTSpec",
    "TokenInput",
    "PatchLayout",
    "ImageTextSimilarity",
    "AnswerLogits",
    "UnsupportedModelError",
    "TargetError",
    "CaptureError",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'captum_legrad' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted([*globals(), *_EXPORTS])
