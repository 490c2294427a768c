"""Head groups: one attention computed by several calls side by side.

timm's ``ParallelThingsBlock`` runs ``k`` attention layers (``H`` heads each) on the same
input and adds their outputs to the residual stream, each through its own output
projection: ``Σ_i W_i · concat_h(A_{i,h} V_{i,h})``. Concatenating every group's heads and
applying one projection ``[W_1 … W_k]`` gives the same sum, so the block *is* one
multi-head attention with ``k·H`` heads, and its ``A^l`` is all of them together.

``E^l`` (the mean over heads and query rows of ``ReLU(∂s/∂A^l)``) is then the mean over all
``Σ_i H_i`` heads: each call's record is reduced on its own (mean over its ``H_i`` heads)
and the layer's map is ``Σ_i (H_i / Σ_j H_j) · E_i``. Nothing else changes: every call's
record is differentiated in the same backward as the other layers' records.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from .errors import CaptureError
from .lean import LeanRecord, Record, record_keys

__all__ = ["head_count", "head_groups", "merge_head_groups"]


def head_count(record: Record, batch: int) -> int:
    """The heads of one attention record (``(B, H, Q, ·)``, or heads flattened into the
    batch, ``(B·H, Q, ·)``): its elements over ``B·Q·last``."""
    tensor = record.output if isinstance(record, LeanRecord) else record
    per_head = batch * tensor.shape[-2] * tensor.shape[-1]
    return max(1, tensor.numel() // per_head)


def head_groups(records: List[Record], batch: int, where: str) -> Tuple[List[Record], List[float]]:
    """A layer's records (one per call) and each call's share of the layer's heads.

    Raises:
        CaptureError: no attention call was seen, or the calls differ in their keys.
    """
    if not records:
        raise CaptureError(
            f"Expected attention computations in {where} during the forward, saw none. "
            "LeGrad records F.scaled_dot_product_attention calls and 4-D softmax results."
        )
    keys = {record_keys(r) for r in records}
    if len(keys) != 1:
        raise CaptureError(
            f"The parallel attention calls in {where} attend over different keys "
            f"({sorted(keys)}): they are not head groups of one attention."
        )
    heads = [head_count(r, batch) for r in records]
    total = float(sum(heads))
    return list(records), [h / total for h in heads]


def merge_head_groups(
    maps: Tensor, owners: Sequence[int], weights: Sequence[float], n_layers: int
) -> Tensor:
    """Per-record maps ``(K, R, B, g_h, g_w)`` → per-layer ``(K, L, B, g_h, g_w)``: the
    records of one layer (``owners[r]`` is record ``r``'s layer) summed with their head
    shares ``weights[r]``."""
    scale = torch.tensor(list(weights), dtype=maps.dtype, device=maps.device)
    index = torch.tensor(list(owners), dtype=torch.long, device=maps.device)
    shape = (maps.shape[0], n_layers, *maps.shape[2:])
    weighted = maps * scale.view(1, -1, *([1] * (maps.dim() - 2)))
    return maps.new_zeros(shape).index_add_(1, index, weighted)
