"""Exception types raised by :mod:`captum_legrad`.

Every error names what was wrong and what to do about it. The classes double as
the built-in exceptions that Captum and its generated test suites expect, so
``except ValueError`` / ``except AssertionError`` / ``except TypeError`` keep
working in code written against Captum's own methods.
"""

from __future__ import annotations

__all__ = ["UnsupportedModelError", "TargetError", "CaptureError"]


class UnsupportedModelError(TypeError):
    """The model is not a Vision Transformer that :func:`captum_legrad.discover` knows.

    Raised by ``LeGrad(model)`` and ``discover(model)``. Pass ``spec=ViTSpec(...)``
    to explain a custom ViT.
    """


class TargetError(ValueError, AssertionError):
    """A ``target`` does not fit the model's output.

    Both a :class:`ValueError` (what the argument is) and an :class:`AssertionError`
    (what Captum's own methods raise for bad targets).
    """


class CaptureError(RuntimeError):
    """Attention probabilities could not be obtained from a module during the call."""
