"""The options of LeGrad and its calls: their allowed values and their validation, once.

:class:`~captum_legrad.LeGrad`'s constructor checks ``route`` and ``pooling`` with
:func:`check_route` and :func:`check_pooling`; every call's options become one frozen
:class:`AttributeOptions`, validated when it is built. The computation below takes them as
given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

__all__ = [
    "ROUTES",
    "POOLINGS",
    "OUTPUTS",
    "INTERPOLATE_MODES",
    "AttributeOptions",
    "check_route",
    "check_pooling",
    "check_output",
    "check_interpolate_mode",
    "check_internal_batch_size",
    "check_threshold",
]

#: How the attention gradient is obtained: ``"lean"`` (from the attention output, the
#: probabilities never materialised; the default) or ``"explicit"`` (the probabilities
#: computed explicitly and differentiated).
ROUTES = ("lean", "explicit")
#: Readouts for the per-layer score: the paper's mean over tokens (the default), or the
#: model's own pooling.
POOLINGS = ("mean", "model")
#: The output forms: the input's shape, one map ``(B, 1, H, W)``, the patch grid.
OUTPUTS = ("input", "map", "grid")
#: ``torch.nn.functional.interpolate`` modes for upsampling the patch grid.
INTERPOLATE_MODES = ("bilinear", "nearest", "nearest-exact", "bicubic", "area")


def _one_of(name: str, value: object, allowed: tuple) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")
    return value


def check_route(route: object) -> str:
    """``route`` if it is one of :data:`ROUTES`, else a ``ValueError``."""
    return _one_of("route", route, ROUTES)


def check_pooling(pooling: object) -> str:
    """``pooling`` if it is one of :data:`POOLINGS`, else a ``ValueError``."""
    return _one_of("pooling", pooling, POOLINGS)


def check_output(output: object) -> str:
    """``output`` if it is one of :data:`OUTPUTS`, else a ``ValueError``."""
    return _one_of("output", output, OUTPUTS)


def check_interpolate_mode(mode: object) -> str:
    """``mode`` if it is one of :data:`INTERPOLATE_MODES`, else a ``ValueError``."""
    return _one_of("interpolate_mode", mode, INTERPOLATE_MODES)


def check_internal_batch_size(value: object) -> Optional[int]:
    """``None`` or a positive int, else a ``ValueError``."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"internal_batch_size must be a positive int or None, got {value!r}.")
    return value


def check_threshold(value: object) -> float:
    """``empty_threshold``: a finite real number, else a ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"empty_threshold must be a finite number, got {value!r}.")
    return float(value)


@dataclass(frozen=True)
class AttributeOptions:
    """The options of one ``attribute`` / ``attribute_multi`` call, validated.

    Attributes:
        interpolate_mode: Upsampling mode from the patch grid to the input size.
        normalize: Min-max normalise each (sample, target) map.
        output: ``"input"``, ``"map"`` or ``"grid"``.
        empty_target: The "empty prompt" target of the SigLIP correction, or None.
        empty_threshold: Threshold of that correction.
        internal_batch_size: At most this many samples per forward and (sample, target)
            maps per backward; None for everything at once.

    Raises:
        ValueError: an option has a value it cannot take.
    """

    interpolate_mode: str = "bilinear"
    normalize: bool = True
    output: str = "input"
    empty_target: Optional[object] = None
    empty_threshold: float = 0.8
    internal_batch_size: Optional[int] = None

    def __post_init__(self) -> None:
        check_output(self.output)
        check_interpolate_mode(self.interpolate_mode)
        check_internal_batch_size(self.internal_batch_size)
        check_threshold(self.empty_threshold)
