"""captum_legrad: LeGrad (arXiv 2404.03214) for Vision Transformers as a Captum attribution.

>>> from captum_legrad import LeGrad
>>> attr = LeGrad(model).attribute(images, target=labels)  # doctest: +SKIP
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._core.options import AttributeOptions
    from .attribution import LeGrad
    from .custom import find_attentions, vit_spec
    from .discovery import discover
    from .errors import CaptureError, TargetError, UnsupportedModelError
    from .scores.features import FeatureDirection
    from .scores.image import ImageImageSimilarity
    from .scores.text import ImageTextSimilarity
    from .scores.vlm import AnswerExplanation, AnswerLogits, explain_answer
    from .spec import AttentionSite, DescribesViT, InputAxes, PatchLayout, TokenInput, ViTSpec

# The names are imported on first use (PEP 562), so that ``import captum_legrad.cli`` (and
# ``captum-legrad --help``) does not import torch.
_EXPORTS = {
    "LeGrad": "attribution",
    "AttributeOptions": "_core.options",
    "discover": "discovery",
    "vit_spec": "custom",
    "find_attentions": "custom",
    "CaptureError": "errors",
    "TargetError": "errors",
    "UnsupportedModelError": "errors",
    "DescribesViT": "spec",
    "InputAxes": "spec",
    "AttentionSite": "spec",
    "PatchLayout": "spec",
    "TokenInput": "spec",
    "ViTSpec": "spec",
    "ImageTextSimilarity": "scores.text",
    "ImageImageSimilarity": "scores.image",
    "FeatureDirection": "scores.features",
    "AnswerLogits": "scores.vlm",
    "AnswerExplanation": "scores.vlm",
    "explain_answer": "scores.vlm",
}

__all__ = [
    "LeGrad",
    "AttributeOptions",
    "discover",
    "vit_spec",
    "find_attentions",
    "ViTSpec",
    "TokenInput",
    "PatchLayout",
    "InputAxes",
    "AttentionSite",
    "DescribesViT",
    "ImageTextSimilarity",
    "ImageImageSimilarity",
    "FeatureDirection",
    "AnswerLogits",
    "AnswerExplanation",
    "explain_answer",
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
