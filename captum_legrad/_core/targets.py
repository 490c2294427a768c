"""Captum's ``target`` semantics, turned into index tensors LeGrad can gather with.

Captum (``captum._utils.common._select_targets``) accepts ``None``, an ``int``, a
tuple of ints, a 0-d / one-element tensor, a 1-D tensor or list of ints of length
``B`` (one class per sample), or a list of ``B`` tuples. This module validates them
against the model's output shape and returns, per non-batch output dimension, a
``(B, K)`` long tensor (``K = 1`` for :meth:`LeGrad.attribute`).
"""

from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..errors import TargetError

__all__ = [
    "TargetIndex",
    "target_index",
    "multi_target_index",
    "count_targets",
    "select_targets",
]

#: ``(B, K)`` long index tensors, one per non-batch output dimension, naming the targets.
TargetIndex = Tuple[Tensor, ...]


def _fail(target: object, output_shape: torch.Size, why: str) -> TargetError:
    return TargetError(
        f"target={target!r} does not fit the model output of shape {tuple(output_shape)}: {why}"
    )


def _check_entry(entry: Tuple[int, ...], target: object, output_shape: torch.Size) -> None:
    dims = tuple(output_shape[1:])
    if len(entry) != len(dims):
        raise _fail(
            target,
            output_shape,
            f"a target needs {len(dims)} index(es) per sample (one per output dimension "
            f"after the batch), got {len(entry)}.",
        )
    for value, size in zip(entry, dims):
        if not 0 <= value < size:
            raise _fail(
                target,
                output_shape,
                f"index {value} is out of range for size {size} (valid: 0..{size - 1}).",
            )


def _as_entry(value: object, target: object, output_shape: torch.Size) -> Tuple[int, ...]:
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value.item())
    if isinstance(value, bool):
        raise _fail(target, output_shape, "a bool is not a class index.")
    if isinstance(value, int):
        entry: Tuple[int, ...] = (value,)
    elif isinstance(value, tuple) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        entry = tuple(value)
    else:
        raise _fail(
            target,
            output_shape,
            f"each target must be an int or a tuple of ints, got {type(value).__name__}.",
        )
    _check_entry(entry, target, output_shape)
    return entry


def _to_index(
    entries: Sequence[Sequence[Tuple[int, ...]]], output_shape: torch.Size, device: torch.device
) -> TargetIndex:
    """``entries[b][k]`` (tuples) → one ``(B, K)`` tensor per output dimension."""
    dims = tuple(output_shape[1:])
    table = torch.tensor(entries, dtype=torch.long).reshape(len(entries), -1, len(dims))
    return tuple(table[..., d].to(device) for d in range(len(dims)))


def _per_sample(target: object) -> bool:
    if isinstance(target, Tensor):
        return target.numel() != 1
    return isinstance(target, list)


def _validated_tensor(target: Tensor, output_shape: torch.Size) -> Tensor:
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise _fail(target, output_shape, f"target tensors must hold integers, got {target.dtype}.")
    return target


def target_index(target: object, output_shape: torch.Size, device: torch.device) -> TargetIndex:
    """Validate a Captum ``target`` for an output of ``output_shape``; ``(B, 1)`` indices.

    Raises:
        TargetError: the target is out of range, has the wrong length, or is ``None``
            while the model has more than one score per sample.
    """
    batch = output_shape[0]
    if target is None:
        if len(output_shape) == 1 or (len(output_shape) == 2 and output_shape[1] == 1):
            shape = output_shape if len(output_shape) == 2 else torch.Size((batch, 1))
            return _to_index([[(0,)]] * batch, shape, device)
        raise _fail(
            target,
            output_shape,
            "target=None only works for one score per sample; pass the class index to "
            "explain (an int, or one per sample).",
        )
    if len(output_shape) < 2:
        raise _fail(target, output_shape, "the output has one score per sample; pass target=None.")
    if isinstance(target, Tensor):
        target = _validated_tensor(target, output_shape)
        if target.numel() != 1 and target.dim() != 1:
            raise _fail(
                target, output_shape, "a tensor target must be 0-d or 1-D (one per sample)."
            )
    if _per_sample(target):
        values: List[object] = (
            list(target.tolist()) if isinstance(target, Tensor) else list(target)  # type: ignore[call-overload]
        )
        if len(values) != batch:
            raise _fail(
                target,
                output_shape,
                f"a per-sample target needs one entry per sample ({batch}), got {len(values)}.",
            )
        if isinstance(target, Tensor) and len(output_shape) != 2:
            raise _fail(target, output_shape, "a tensor of targets needs a 2-D (B, C) output.")
        entries = [[_as_entry(v, target, output_shape)] for v in values]
    else:
        entry = _as_entry(target, target, output_shape)
        entries = [[entry]] * batch
    return _to_index(entries, output_shape, device)


def multi_target_index(
    targets: Union[Sequence[object], Tensor], output_shape: torch.Size, device: torch.device
) -> TargetIndex:
    """``K`` targets for every sample → ``(B, K)`` indices.

    ``targets`` is a sequence of ``K`` ints or tuples (the same for every sample), a 1-D
    tensor of ``K`` class indices, or a 2-D ``(B, K)`` tensor (``K`` per sample).
    """
    batch = output_shape[0]
    if len(output_shape) < 2:
        raise _fail(targets, output_shape, "the output has one score per sample.")
    if isinstance(targets, Tensor):
        targets = _validated_tensor(targets, output_shape)
        if targets.dim() == 2:
            if targets.shape[0] != batch:
                raise _fail(targets, output_shape, f"a 2-D targets tensor must be ({batch}, K).")
            rows = [
                [_as_entry(int(v), targets, output_shape) for v in row] for row in targets.tolist()
            ]
            if not rows or not rows[0]:
                raise _fail(targets, output_shape, "no targets given.")
            return _to_index(rows, output_shape, device)
        if targets.dim() != 1:
            raise _fail(targets, output_shape, "targets must be a 1-D or (B, K) tensor.")
        targets = targets.tolist()
    if isinstance(targets, (str, bytes)) or not isinstance(targets, Sequence):
        raise _fail(targets, output_shape, "targets must be a sequence of class indices.")
    if len(targets) == 0:
        raise _fail(targets, output_shape, "no targets given.")
    row = [_as_entry(t, targets, output_shape) for t in targets]
    return _to_index([row] * batch, output_shape, device)


def count_targets(targets: Union[Sequence[object], Tensor]) -> int:
    """``K``, the number of targets :func:`multi_target_index` will return per sample.

    Raises:
        TargetError: ``targets`` is not a sequence, a 1-D tensor or a 2-D ``(B, K)`` tensor.
    """
    if isinstance(targets, Tensor):
        if targets.dim() not in (1, 2):
            raise TargetError(
                f"targets={targets!r} must be a 1-D tensor of K class indices or a (B, K) "
                f"tensor, got a {targets.dim()}-D tensor; for one class use attribute(target=...) "
                "or targets=[k]."
            )
        return int(targets.shape[-1])
    if isinstance(targets, (str, bytes)) or not isinstance(targets, Sequence):
        raise TargetError(
            f"targets={targets!r} must be a sequence of class indices (ints or tuples), a 1-D "
            "tensor or a (B, K) tensor."
        )
    return len(targets)


def select_targets(scores: Tensor, target: object) -> Tensor:
    """``scores[b, target_b]`` for a Captum ``target``, validated: ``(B,)``.

    Raises:
        TargetError: as :func:`target_index`.
    """
    index = target_index(target, scores.shape, scores.device)
    if scores.dim() == 1:
        return scores
    rows = torch.arange(scores.shape[0], device=scores.device)
    return scores[(rows, *(i[:, 0] for i in index))]
