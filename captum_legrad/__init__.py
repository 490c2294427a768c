"""captum_legrad: LeGrad (arXiv 2404.03214) for Vision Transformers as a Captum attribution.

>>> from captum_legrad import LeGrad
>>> attr = LeGrad(model).attribute(images, target=labels)  # doctest: +SKIP
"""

from .attribution import LeGrad
from .discovery import discover
from .errors import CaptureError, TargetError, UnsupportedModelError
from .spec import PatchLayout, TokenInput, ViTSpec
from .text import ImageTextSimilarity
from .vlm import AnswerLogits

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
