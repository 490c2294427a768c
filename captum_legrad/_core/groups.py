"""Head groups: one attention computed by several calls side by side.

timm's ``ParallelThingsBlock`` runs ``k`` attention layers (``H`` heads each) on the same
input and adds their outputs to the residual stream, each through its own output
projection: ``Σ_i W_i · concat_h(A_{i,h} V_{i,h})``. Concatenating every group's heads and
applying one projection ``[W_1 … W_k]`` gives the same sum, so the block *is* one
multi-head attention with ``k·H`` heads, and its ``A^l`` is all of them together.

``E^l`` (the mean over heads and query rows of ``ReLU(∂s/∂A^l)``) is then the mean over all
``Σ_i H_i`` heads: each call's record is reduced on its own (mean over its ``H_i`` heads)
and the layer's map is ``Σ_i (H_i / Σ_j H_j) · E_i`` (each call a
:class:`~captum_legrad._core.compute.Part` with that share). Nothing else changes: every
call's record is differentiated in the same backward as the other layers' records.
"""

from __future__ import annotations

from typing import List, Tuple

from ..errors import CaptureError
from .records import AttentionRecord

__all__ = ["head_groups"]


def head_groups(
    records: List[AttentionRecord], batch: int, where: str
) -> Tuple[List[AttentionRecord], List[float]]:
    """A layer's records (one per call) and each call's share of the layer's heads.

    Raises:
        CaptureError: no attention call was seen, or the calls differ in their keys.
    """
    if not records:
        raise CaptureError(
            f"Expected attention computations in {where} during the forward, saw none. "
            "LeGrad records F.scaled_dot_product_attention calls and 4-D softmax results."
        )
    keys = {r.num_keys for r in records}
    if len(keys) != 1:
        raise CaptureError(
            f"The parallel attention calls in {where} attend over different keys "
            f"({sorted(keys)}): they are not head groups of one attention."
        )
    heads = [r.num_heads(batch) for r in records]
    total = float(sum(heads))
    return list(records), [h / total for h in heads]
