"""Argument rules shared by :class:`~captum_legrad.LeGrad` and the baselines.

One place checks block indices and images, so that the same mistake gets the same
Captum-style error from every method. Targets are checked by :mod:`.targets`, the options
(route, pooling, output, ...) by :mod:`.options`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..spec import IMAGE_AXES, InputAxes

__all__ = [
    "resolve_layers",
    "resolve_layer",
    "ImageFormat",
    "image_format",
    "check_inputs_are_tensors",
    "check_image",
    "check_patches",
    "check_values",
    "dtype_mismatch",
]


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


@dataclass(frozen=True)
class ImageFormat:
    """What a model's patch embedding takes: its input channels and its weights' dtype
    (``None`` where the model has no patch-embedding convolution to read them from)."""

    channels: Optional[int] = None
    dtype: Optional[torch.dtype] = None


def image_format(root: nn.Module, blocks: Sequence[nn.Module]) -> ImageFormat:
    """The :class:`ImageFormat` of a ViT: the first ``Conv2d`` outside the blocks is the one
    the image enters (a patch embedding, or the first convolution of a stem: XCiT,
    ViTamin), so its input channels are the image's (the structure every ViT has; no family
    knowledge)."""
    inside = {id(m) for block in blocks for m in block.modules()}
    for module in root.modules():
        if isinstance(module, nn.Conv2d) and id(module) not in inside:
            return ImageFormat(module.in_channels, module.weight.dtype)
    return ImageFormat()


def check_inputs_are_tensors(inputs: Any, method: str = "LeGrad") -> None:
    """A ``ValueError`` for numpy arrays (and tuples of them), naming the conversion."""
    items = inputs if isinstance(inputs, tuple) else (inputs,)
    for item in items:
        if type(item).__module__ == "numpy" and hasattr(item, "shape"):
            raise ValueError(
                f"inputs is a numpy array of shape {tuple(item.shape)}; {method} takes torch "
                "tensors (B, C, H, W): pass torch.from_numpy(x).float() (for an (H, W, C) "
                "image: torch.from_numpy(x).permute(2, 0, 1)[None].float())."
            )


def check_image(
    image: object,
    method: str = "LeGrad",
    expected: Optional[ImageFormat] = None,
    axes: InputAxes = IMAGE_AXES,
) -> Tensor:
    """A finite floating point input batch in the layout the model takes (``(B, C, H, W)``
    for images, ``axes`` in general), or a ``ValueError`` saying what was given, what the
    model expects and how to fix it."""
    if not isinstance(image, Tensor):
        raise ValueError(f"inputs must be tensors, got {type(image).__name__}.")
    if axes != IMAGE_AXES:
        return _check_input(image, method, axes)
    expected = expected or ImageFormat()
    channels = expected.channels
    if image.dim() == 3 and (channels is None or image.shape[0] == channels):
        raise ValueError(
            f"{method} explains image batches (B, C, H, W), got one image of shape "
            f"{tuple(image.shape)}: add the batch dimension with x.unsqueeze(0)."
        )
    if image.dim() != 4:
        raise ValueError(
            f"{method} explains images: the first input must be (B, C, H, W), got shape "
            f"{tuple(image.shape)}."
        )
    if channels is not None and image.shape[1] != channels:
        given = tuple(image.shape)
        if image.shape[-1] == channels:
            raise ValueError(
                f"inputs of shape {given} look channels-last (B, H, W, C); the model takes "
                f"(B, C, H, W) with C = {channels}: pass x.permute(0, 3, 1, 2)."
            )
        if image.shape[1] == 1:
            raise ValueError(
                f"inputs of shape {given} have 1 channel (grayscale); the model takes "
                f"{channels} channels: pass x.expand(-1, {channels}, -1, -1) (or convert the "
                "image to RGB before preprocessing)."
            )
        raise ValueError(
            f"inputs of shape {given} have {image.shape[1]} channels; the model takes "
            f"(B, {channels}, H, W)."
        )
    if not image.is_floating_point():
        raise ValueError(
            f"inputs must be floating point images, got dtype {image.dtype}; convert with "
            "x.float() (and normalise as the model expects)."
        )
    if not _finite(image):
        raise ValueError(f"inputs contain NaN or infinite values; {method} needs finite images.")
    return image


def _check_input(inputs: Tensor, method: str, axes: InputAxes) -> Tensor:
    """The checks of :func:`check_image` for a video or spectrogram batch."""
    if inputs.dim() != axes.ndim:
        hint = ""
        if inputs.dim() == axes.ndim - 1:
            hint = ": for one input, add the batch dimension with x.unsqueeze(0)"
        raise ValueError(
            f"{method} explains {axes.name} batches {axes.shape()} for this model, got shape "
            f"{tuple(inputs.shape)}{hint}."
        )
    if not inputs.is_floating_point():
        raise ValueError(
            f"inputs must be floating point, got dtype {inputs.dtype}; convert with x.float() "
            f"(and prepare the {axes.name} as the model's processor does)."
        )
    if not _finite(inputs):
        raise ValueError(f"inputs contain NaN or infinite values; {method} needs finite inputs.")
    return inputs


def dtype_mismatch(
    image: Tensor, expected: ImageFormat, error: BaseException
) -> Optional[ValueError]:
    """The one-line error for a forward that failed on an image whose dtype differs from the
    model's weights (timm, OpenCLIP and torchvision do not cast their inputs; transformers
    models do, so they never get here), or None if ``error`` is something else."""
    if expected.dtype is None or image.dtype == expected.dtype:
        return None
    text = str(error).lower()
    if not any(word in text for word in ("dtype", "type", "double", "float", "half")):
        return None
    return ValueError(
        f"inputs are {image.dtype} but the model's weights are {expected.dtype}: convert the "
        f"images with x.to({expected.dtype}) (x.float() for float32), or the model with "
        "model.to(x.dtype)."
    )


def _finite(tensor: Tensor) -> bool:
    """Whether every value is finite. A finite sum (one cheap reduction) proves it; only a
    non-finite sum (NaN or ±inf inside, or an overflow of large finite values) needs the
    element-wise check."""
    if tensor.numel() == 0 or bool(torch.isfinite(tensor.sum(dtype=torch.float64))):
        return True
    return bool(torch.isfinite(tensor).all())


def check_values(values: object, method: str = "LeGrad") -> Tensor:
    """A finite floating point tensor of any shape (an input whose dimension 0 is not the
    batch, e.g. Qwen-VL's flattened patches), or a ``ValueError`` saying why not."""
    if not isinstance(values, Tensor):
        raise ValueError(f"inputs must be tensors, got {type(values).__name__}.")
    if not values.is_floating_point():
        raise ValueError(f"the input must be floating point, got dtype {values.dtype}.")
    if not _finite(values):
        raise ValueError(f"inputs contain NaN or infinite values; {method} needs finite values.")
    return values


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
