"""Argument rules shared by :class:`~captum_legrad.LeGrad` and the baselines.

One place checks block indices and images, so that the same mistake gets the same
Captum-style error from every method. Targets are checked by :mod:`.targets`, the options
(route, pooling, output, ...) by :mod:`.options`.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["resolve_layers", "resolve_layer", "check_image", "check_patches"]


def resolve_layer(layer: object, depth: int) -> int:
    """One block index (negative counts from the end) → ``0..depth-1``.

    Raises:
        TypeError: ``layer`` is not an int.
        ValueError: it is out of range for a model with ``depth`` blocks.
    """
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layers must hold ints, got {layer!r}.")
    if not -depth <= layer < depth:
        raise ValueError(
            f"layer {layer} is out of range for a model with {depth} blocks "
            f"(valid: {-depth}..{depth - 1})."
        )
    return layer % depth


def resolve_layers(layers: Optional[Sequence[int]], depth: int) -> Tuple[int, ...]:
    """``None`` (all blocks) or a sequence of block indices → sorted, distinct indices.

    Raises:
        TypeError: ``layers`` is not a sequence of ints (a single int included).
        ValueError: it is empty, out of range, or names a block twice.
    """
    if layers is None:
        return tuple(range(depth))
    if isinstance(layers, (int, str, bytes)) or not isinstance(layers, Sequence):
        raise TypeError(
            f"layers must be None (all blocks) or a sequence of block indices, got {layers!r}; "
            "for one block write layers=[i]."
        )
    if len(layers) == 0:
        raise ValueError("layers is empty: pass None for all blocks or at least one block index.")
    resolved = [resolve_layer(layer, depth) for layer in layers]
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"layers={list(layers)} names the same block more than once.")
    return tuple(sorted(resolved))


def check_image(image: object, method: str = "LeGrad") -> Tensor:
    """A finite floating point image batch ``(B, C, H, W)``, or a ``ValueError`` saying why not."""
    if not isinstance(image, Tensor):
        raise ValueError(f"inputs must be tensors, got {type(image).__name__}.")
    if image.dim() != 4:
        raise ValueError(
            f"{method} explains images: the first input must be (B, C, H, W), got shape "
            f"{tuple(image.shape)}."
        )
    if not image.is_floating_point():
        raise ValueError(
            f"inputs must be floating point images, got dtype {image.dtype}; convert with "
            "x.float() (and normalise as the model expects)."
        )
    if not _finite(image):
        raise ValueError(f"inputs contain NaN or infinite values; {method} needs finite images.")
    return image


def _finite(tensor: Tensor) -> bool:
    """Whether every value is finite. A finite sum (one cheap reduction) proves it; only a
    non-finite sum (NaN or ±inf inside, or an overflow of large finite values) needs the
    element-wise check."""
    if tensor.numel() == 0 or bool(torch.isfinite(tensor.sum(dtype=torch.float64))):
        return True
    return bool(torch.isfinite(tensor).all())


def check_patches(patches: Tensor, method: str = "LeGrad") -> Tensor:
    """A finite floating point patch sequence ``(B, N, p_h·p_w·C)`` (NaFlex models), or a
    ``ValueError`` saying why not."""
    if patches.dim() != 3:
        raise ValueError(
            f"{method} explains images: the first input must be (B, C, H, W), or for this NaFlex "
            f"model a patch sequence (B, N, p_h*p_w*C); got shape {tuple(patches.shape)}."
        )
    if not patches.is_floating_point():
        raise ValueError(f"patches must be floating point, got dtype {patches.dtype}.")
    if not _finite(patches):
        raise ValueError(f"inputs contain NaN or infinite values; {method} needs finite patches.")
    return patches
