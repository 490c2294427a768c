"""Saved tensors kept at the read rows only: the lean route's graph of a decoder layer.

A language model's answer logit ``j`` reads block ``l``'s output ``Z^l`` at one row
``p_j`` only, and a decoder layer computes per token after its attention (output
projection, residual, norms, MLP or MoE). On the lean route a selected block's graph starts
at its attention output ``O`` (:mod:`.routes`), so every tensor the block saves for the
backward belongs to that per-token part, and the gradient reaching ``O`` is zero at every
row the readout does not read. The tensors saved at the other rows are never needed, yet a
layer keeps them all: for a sequence of ``N`` tokens, ``N`` rows of the MLP's activations
(thousands wide), per layer, which is most of LeGrad's memory on a long image-token
sequence.

:class:`ReadRows` packs (``torch.autograd.graph.saved_tensors_hooks``) every floating
tensor laid out over the block's tokens, ``(B, N, …)``, as its read rows only, and unpacks
it with ones at the other rows: there the incoming gradient is zero and every per-token
backward formula gives zero from a finite saved value (ones, not zeros, so that a saved
divisor or ``rsqrt`` stays finite). So the maps are unchanged and the graph's memory is
linear in the read rows ``R``, not in ``N``. Other tensors (parameters, index tensors,
tensors of other shapes) are kept as they are, also tokens flattened to ``(B·N, …)``: an
MoE layer gathers them per expert in an order of its own (Gemma 4 lists a token's first
choices before its second ones), so a flattened tensor is not known to be token-major. The
hooks are thread-local and scoped to one forward (:func:`~.capture.capture_blocks`).

Which rows are read is the spec's knowledge (:attr:`~captum_legrad.spec.ViTSpec.read_rows`),
and so is the promise that the blocks compute per token after their attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = ["ReadRows", "RowsKept"]


@dataclass(frozen=True)
class RowsKept:
    """A saved tensor as :meth:`ReadRows.pack` keeps it: ``kept`` ``(B, R, …)``, its rows
    ``(B, R)`` of a tensor of ``shape``."""

    kept: Tensor
    rows: Tensor  # (B, R)
    shape: torch.Size


def _is_parameter(tensor: Tensor) -> bool:
    base = tensor._base
    return isinstance(tensor, nn.Parameter) or isinstance(base, nn.Parameter)


class ReadRows:
    """Pack and unpack hooks that keep a block's saved tensors at the read rows only.

    Args:
        rule: Returns the read rows ``(B, R)`` (long) of the current forward; called once,
            at the first tensor saved inside a selected block.

    Use ``tokens`` to say which token layout the current block has (``(B, N)``, set by the
    block's pre-hook), and :meth:`hooks` for ``torch.autograd.graph.saved_tensors_hooks``.
    """

    def __init__(self, rule: Callable[[], Tensor]) -> None:
        self._rule = rule
        self._rows: Optional[Tensor] = None
        self._on: Dict[torch.device, Tensor] = {}
        #: ``(B, N)`` of the block running now, or None outside the selected blocks.
        self.tokens: Optional[Tuple[int, int]] = None

    def _index(self, device: torch.device) -> Tensor:
        """The rows ``(B, R)`` on ``device``."""
        if device not in self._on:
            if self._rows is None:
                self._rows = self._rule().long()
            self._on[device] = self._rows.to(device)
        return self._on[device]

    def pack(self, tensor: Tensor) -> Any:
        """``tensor`` at the read rows if it is laid out ``(B, N, …)`` over the block's
        tokens."""
        if self.tokens is None or not tensor.is_floating_point() or _is_parameter(tensor):
            return tensor
        if tensor.dim() < 2 or tuple(tensor.shape[:2]) != self.tokens:
            return tensor
        rows = self._index(tensor.device)
        samples = torch.arange(rows.shape[0], device=tensor.device).unsqueeze(1)
        return RowsKept(tensor[samples, rows], rows, tensor.shape)

    @staticmethod
    def unpack(packed: Any) -> Tensor:
        """A packed tensor back at its shape: the read rows, ones elsewhere."""
        if not isinstance(packed, RowsKept):
            return packed
        kept = packed.kept
        full = kept.new_ones(packed.shape)
        samples = torch.arange(packed.shape[0], device=kept.device).unsqueeze(1)
        full[samples, packed.rows] = kept
        return full

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        """The context manager installing :meth:`pack` and :meth:`unpack`."""
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
