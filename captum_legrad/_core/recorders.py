"""The torch-function modes that record attention while one attention module runs.

Each recorder is a ``TorchFunctionMode`` that a thread-scoped forward pre-hook pushes when an
attention module LeGrad needs starts and its forward hook pops when it ends
(:func:`~captum_legrad._core.capture.record_attention`). Inside, every torch function call
is classified by :func:`~captum_legrad._core.attention.attention_kind` and the attention
calls leave an :class:`~captum_legrad._core.records.AttentionRecord`:

* :class:`ExplicitRecorder` (``route="explicit"``): fused and multi-head attention are
  computed explicitly and their probabilities recorded
  (:class:`~captum_legrad._core.records.ProbabilityRecord`); eager probabilities are
  recorded as they are.
* :class:`LeanRecorder` (``route="lean"``, the default): the model's own attention call
  runs unchanged and without a graph; its output becomes the leaf the rest of the block
  computes from, recorded with ``V``
  (:class:`~captum_legrad._core.records.OutputRecord`). Eager attention: the softmax
  result is made a leaf, and the next ``matmul`` / ``bmm`` that multiplies it (through
  ``to`` / ``dropout``) with ``V`` becomes the leaf ``O``; an eager softmax never followed
  by such a product stays the recorded leaf (a probability record).
* :class:`ValueRecorder` (lean route, ``ViTSpec.product_inputs``): keeps the value of the
  last attention product; the record is made at another module's input.

What the model computes is unchanged in every case.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from . import grad_mode
from .attention import (
    PASS_THROUGH,
    PRODUCTS,
    AttentionKind,
    MultiheadCall,
    SdpaCall,
    attention_kind,
    explicit_sdpa,
    masked_softmax,
)
from .records import AttentionRecord, OutputRecord, ProbabilityRecord, new_leaf

__all__ = ["ExplicitRecorder", "LeanRecorder", "ValueRecorder", "compact_value"]


def compact_value(value: Tensor) -> Tensor:
    """``value`` detached, copied if it views a larger buffer (timm's packed ``qkv``), so
    that keeping ``V`` does not keep ``Q`` and ``K`` alive."""
    value = value.detach()
    if value.untyped_storage().nbytes() > value.numel() * value.element_size():
        return value.clone()
    return value


class ExplicitRecorder(TorchFunctionMode):
    """Records the attention probabilities computed while it is active (explicit route)."""

    def __init__(self, records: List[AttentionRecord]) -> None:
        super().__init__()
        self.records = records

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: Sequence[Any] = (),
        kwargs: Optional[Dict[str, Any]] = None,
    ) -> Any:
        kwargs = kwargs or {}
        kind = attention_kind(func)
        if kind is AttentionKind.FUSED:
            out, probs = explicit_sdpa(*args, **kwargs)
            self.records.append(ProbabilityRecord(probs))
            return out
        if kind is AttentionKind.MULTIHEAD:
            call = MultiheadCall.bind(args, kwargs)
            q, k, v = call.projections()
            out, probs = explicit_sdpa(q, k, v, call.mask(q.dtype, q.device), call.dropout)
            self.records.append(ProbabilityRecord(probs))
            return call.output(out), call.weights(probs)
        result = func(*args, **kwargs)
        if attention_kind(func, result) is AttentionKind.EAGER:
            self.records.append(ProbabilityRecord(result))
        return result


def _lean_multihead(call: MultiheadCall) -> Tuple[Tensor, Optional[Tensor], AttentionRecord]:
    """``nn.MultiheadAttention``'s attention on the lean route: the projections without a
    graph, ``O`` by ``F.scaled_dot_product_attention`` made a leaf. With ``need_weights``
    the probabilities are computed explicitly and become the recorded leaf instead (the
    weights might be used)."""
    with torch.no_grad():
        q, k, v = call.projections()
        mask = call.mask(q.dtype, q.device)
        if call.need_weights:
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
            probs = masked_softmax(scores, mask)
            if call.dropout > 0.0:
                probs = F.dropout(probs, p=call.dropout)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=call.dropout)
    record: AttentionRecord
    if call.need_weights:
        leaf = new_leaf(probs)
        grad_mode.graph_started()
        record, out, weights = ProbabilityRecord(leaf), leaf @ v, call.weights(leaf)
    else:
        record = OutputRecord(new_leaf(out), compact_value(v))
        grad_mode.graph_started()
        out, weights = record.leaf, None
    return call.output(out), weights, record


class LeanRecorder(TorchFunctionMode):
    """Records the lean route's attention outputs while it is active (see the module doc).

    Entering it switches gradients off (the attention's inputs need no graph); the
    recorded leaf switches them on again for the rest of the block (:mod:`.grad_mode`).
    """

    def __init__(self, records: List[AttentionRecord]) -> None:
        super().__init__()
        self.records = records
        self._pending: Optional[Tensor] = None  # eager probabilities awaiting their matmul
        self._pending_slot = -1

    def __enter__(self) -> LeanRecorder:
        self._pending = None
        grad_mode.attention_entered()
        super().__enter__()
        return self

    def _leaf_output(self, out: Tensor, value: Tensor, probs: Optional[Tensor]) -> OutputRecord:
        record = OutputRecord(new_leaf(out), compact_value(value), probs)
        grad_mode.graph_started()
        return record

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: Sequence[Any] = (),
        kwargs: Optional[Dict[str, Any]] = None,
    ) -> Any:
        kwargs = kwargs or {}
        kind = attention_kind(func)
        if kind is AttentionKind.FUSED:
            with torch.no_grad():
                out = func(*args, **kwargs)
            record = self._leaf_output(out, SdpaCall.bind(args, kwargs).value, None)
            self.records.append(record)
            return record.output
        if kind is AttentionKind.MULTIHEAD:
            out, weights, mha_record = _lean_multihead(MultiheadCall.bind(args, kwargs))
            self.records.append(mha_record)
            return out, weights
        pending = self._pending
        if pending is not None and args and args[0] is pending:
            if func in PRODUCTS:
                with torch.no_grad():
                    out = func(*args, **kwargs)
                probs = self.records[self._pending_slot]
                assert isinstance(probs, ProbabilityRecord)
                record = self._leaf_output(out, args[1], probs.probabilities)
                self.records[self._pending_slot] = record
                self._pending = None
                return record.output
            if func in PASS_THROUGH:
                result = func(*args, **kwargs)
                self._pending = result if isinstance(result, Tensor) else None
                return result
        result = func(*args, **kwargs)
        if attention_kind(func, result) is AttentionKind.EAGER:
            probs_leaf = new_leaf(result)
            grad_mode.graph_started()
            self.records.append(ProbabilityRecord(probs_leaf))
            self._pending, self._pending_slot = probs_leaf, len(self.records) - 1
            return probs_leaf
        return result


class ValueRecorder(TorchFunctionMode):
    """Keeps the value operand of the last attention product computed while it is active
    (``F.scaled_dot_product_attention``'s ``value``, or the right operand of ``matmul``),
    with gradients off like :class:`LeanRecorder`: the lean route of
    :attr:`~captum_legrad.spec.ViTSpec.product_inputs`, where the attention output becomes
    a leaf at the input of another module."""

    def __init__(self) -> None:
        super().__init__()
        self.value: Optional[Tensor] = None

    def __enter__(self) -> ValueRecorder:
        self.value = None
        grad_mode.attention_entered()
        super().__enter__()
        return self

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: Sequence[Any] = (),
        kwargs: Optional[Dict[str, Any]] = None,
    ) -> Any:
        kwargs = kwargs or {}
        if attention_kind(func) is AttentionKind.FUSED:
            self.value = SdpaCall.bind(args, kwargs).value
        elif func in PRODUCTS and len(args) > 1 and isinstance(args[1], Tensor):
            self.value = args[1]
        return func(*args, **kwargs)

    def record(self, output: Tensor) -> OutputRecord:
        """The lean record of an attention output ``O = A·V`` met at a module's input."""
        assert self.value is not None
        record = OutputRecord(new_leaf(output), compact_value(self.value))
        grad_mode.graph_started()
        self.value = None
        return record
