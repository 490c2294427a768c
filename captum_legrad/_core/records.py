"""Attention records: what one attention call leaves for LeGrad's backward.

LeGrad needs, per attention call, ``E = mean over heads and query rows of ReLU(∂s/∂A)``
over the keys. A record is where the backward stops for that call and how the gradient
there becomes ``E``; the :class:`AttentionRecord` protocol is all the computation
(:mod:`.compute`, :mod:`.groups`) knows of it. Two implementations:

* :class:`ProbabilityRecord`: the probabilities ``A`` themselves, on the graph (the
  explicit route, and eager probabilities the lean route keeps): the gradient *is*
  ``∂s/∂A``.
* :class:`OutputRecord`: the lean route's record, the attention output ``O = A·V`` as a
  leaf and ``V``: since the block input is cut, ``A`` reaches the score only through
  ``O``, so ``∂s/∂A = (∂s/∂O)·Vᵀ`` exactly (:func:`reduce_lean` forms ``E`` from it in
  query chunks, never holding the ``Q × N_k`` matrix). Eager attention that also uses its
  probabilities otherwise keeps them as :attr:`~OutputRecord.direct`, whose gradient is
  added before the ReLU.

A new route or attention kind is one new class with these members.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

from ..errors import CaptureError

__all__ = [
    "AttentionRecord",
    "ProbabilityRecord",
    "OutputRecord",
    "new_leaf",
    "reduce_lean",
    "prune_direct",
    "REDUCE_CHUNK_ELEMENTS",
]

#: Elements of one chunk of ``dO · Vᵀ`` (targets × batch × heads × queries × keys) in
#: :func:`reduce_lean`: 2**24 is 64 MiB in float32.
REDUCE_CHUNK_ELEMENTS = 1 << 24


def new_leaf(tensor: Tensor) -> Tensor:
    """``tensor`` detached, as a new leaf that requires grad. Changes no grad mode: where a
    block's graph starts at this leaf, the caller says so (:mod:`.grad_mode`)."""
    return tensor.detach().requires_grad_()


@runtime_checkable
class AttentionRecord(Protocol):
    """What one attention call leaves for the backward."""

    @property
    def leaf(self) -> Tensor:
        """The tensor the backward differentiates (it requires grad)."""
        ...

    @property
    def direct(self) -> Optional[Tensor]:
        """A second leaf whose gradient adds to the record's before the ReLU, or None."""
        ...

    def drop_direct(self) -> None:
        """Forget :attr:`direct` (the block's output does not depend on it)."""
        ...

    @property
    def num_keys(self) -> int:
        """The attention's key count ``N_k``."""
        ...

    def num_heads(self, batch: int) -> int:
        """The attention's head count, for a batch of ``batch`` samples."""
        ...

    def reduce(
        self,
        grad: Tensor,
        *,
        rows: int,
        batched: bool,
        query: Optional[int] = None,
        direct: Optional[Tensor] = None,
    ) -> Tensor:
        """The gradient at :attr:`leaf` → ``(k, rows, N_k)``, the mean over heads and query
        rows of the ReLU of ``∂s/∂A`` in float32.

        Args:
            grad: ``∂s/∂leaf``, with a leading target dimension ``k`` if ``batched``.
            rows: The samples ``B`` (heads may be flattened into the batch dimension).
            batched: Whether ``grad`` has the target dimension (else ``k = 1``).
            query: Keep this query row only (CoCa's first latent).
            direct: The gradient at :attr:`direct`, if any.
        """
        ...

    def reduce_rows(self, grad: Tensor, rows: Tensor) -> Tensor:
        """One gradient holding each target's in its own query row ``rows`` ``(B, K)`` →
        ``(K, B, N_k)``: per target, the ReLU of its row summed over heads ÷ (H·Q)."""
        ...


def _split_heads(tensor: Tensor, rows: int, batched: bool) -> Tensor:
    """``(…, rows·H, Q, ·)`` with heads flattened into the batch (attention computed with
    ``bmm``, as transformers < 4.52 CLIP does) → ``(…, rows, H, Q, ·)``."""
    if tensor.dim() == (4 if batched else 3):
        return tensor.unflatten(-3, (rows, -1))
    return tensor


def _heads(tensor: Tensor, batch: int) -> int:
    """The heads of ``(B, H, Q, ·)`` or ``(B·H, Q, ·)``: elements over ``B·Q·last``."""
    per_head = batch * tensor.shape[-2] * tensor.shape[-1]
    return max(1, tensor.numel() // per_head)


class ProbabilityRecord:
    """The attention probabilities ``A`` ``(B, H, Q, N_k)`` (or ``(B·H, Q, N_k)``), on the
    graph: their gradient is ``∂s/∂A``."""

    def __init__(self, probabilities: Tensor) -> None:
        self.probabilities = probabilities

    @property
    def leaf(self) -> Tensor:
        return self.probabilities

    @property
    def direct(self) -> Optional[Tensor]:
        return None

    def drop_direct(self) -> None:
        pass

    @property
    def num_keys(self) -> int:
        return int(self.probabilities.shape[-1])

    def num_heads(self, batch: int) -> int:
        return _heads(self.probabilities, batch)

    def reduce(
        self,
        grad: Tensor,
        *,
        rows: int,
        batched: bool,
        query: Optional[int] = None,
        direct: Optional[Tensor] = None,
    ) -> Tensor:
        grad = _split_heads(grad, rows, batched)
        if query is not None:
            grad = grad[..., query : query + 1, :]
        reduced = grad.clamp(min=0).float().mean(dim=(-3, -2))
        return reduced if batched else reduced.unsqueeze(0)

    def reduce_rows(self, grad: Tensor, rows: Tensor) -> Tensor:
        grad = _split_heads(grad, rows.shape[0], False)  # (B, H, Q, N_k)
        heads, n_q, n_k = grad.shape[-3:]
        where = rows.to(grad.device)[:, None, :, None].expand(-1, heads, -1, n_k)
        picked = grad.gather(-2, where)  # (B, H, K, N_k)
        total = picked.clamp(min=0).float().sum(dim=1) / (heads * n_q)  # (B, K, N_k)
        return total.transpose(0, 1)


class OutputRecord:
    """The lean route's record: the attention output ``O`` ``(…, H, Q, d)`` as a leaf that
    requires grad (the rest of the module computes from it) and ``V`` ``(…, H_kv, N_k, d)``,
    detached: ``∂s/∂A = (∂s/∂O) · Vᵀ``.

    ``probabilities``: eager attention's probabilities, a leaf too, kept (after
    :func:`prune_direct`) only if the block's output depends on them besides through
    ``O``; their gradient then adds to ``dO · Vᵀ``.
    """

    #: Bound on the elements of one chunk of ``dO · Vᵀ`` in :meth:`reduce`.
    chunk_elements = REDUCE_CHUNK_ELEMENTS

    def __init__(self, output: Tensor, value: Tensor, probabilities: Optional[Tensor] = None):
        self.output = output
        self.value = value
        self.probabilities = probabilities

    @property
    def leaf(self) -> Tensor:
        return self.output

    @property
    def direct(self) -> Optional[Tensor]:
        return self.probabilities

    def drop_direct(self) -> None:
        self.probabilities = None

    @property
    def num_keys(self) -> int:
        return int(self.value.shape[-2])

    def num_heads(self, batch: int) -> int:
        return _heads(self.output, batch)

    def reduce(
        self,
        grad: Tensor,
        *,
        rows: int,
        batched: bool,
        query: Optional[int] = None,
        direct: Optional[Tensor] = None,
    ) -> Tensor:
        flat = grad.dim() == (4 if batched else 3)  # heads flattened into the batch
        reduced = reduce_lean(
            grad, self.value, query, rows if flat else None, self.chunk_elements, direct
        )
        return reduced if batched else reduced.unsqueeze(0)

    def reduce_rows(self, grad: Tensor, rows: Tensor) -> Tensor:
        grad = _split_heads(grad, rows.shape[0], False)  # (B, H, Q, d)
        heads, n_q, width = grad.shape[-3:]
        where = rows.to(grad.device)[:, None, :, None].expand(-1, heads, -1, width)
        picked = grad.gather(-2, where)  # (B, H, K, d): the rows of dO
        per_row = picked.permute(2, 0, 1, 3).unsqueeze(-2)  # (K, B, H, 1, d)
        # mean over one row → over all Q
        return reduce_lean(per_row, self.value, chunk_elements=self.chunk_elements) / n_q


def reduce_lean(
    grad_output: Tensor,
    value: Tensor,
    query: Optional[int] = None,
    rows: Optional[int] = None,
    chunk_elements: Optional[int] = None,
    extra: Optional[Tensor] = None,
) -> Tensor:
    """``mean over heads and queries of ReLU(dO · Vᵀ)`` without the ``(Q × N_k)`` matrix.

    Args:
        grad_output: ``dO = ∂s/∂O``, ``(*lead, H, Q, d)``: ``lead`` is ``(B,)`` or ``(K,
            B)`` with batched targets; heads flattened into the batch (``(*, B·H, Q, d)``,
            pass ``rows=B``) are split back.
        value: ``V`` ``(B, H_kv, N_k, d)`` (or ``(B·H_kv, N_k, d)``); ``H_kv`` may divide
            ``H`` (grouped-query attention: query head ``h`` uses value head ``h // (H /
            H_kv)``).
        query: Keep only this query row (CoCa's first latent).
        rows: ``B`` when heads are flattened into the batch dimension.
        chunk_elements: Bound on the elements of one chunk of ``dO · Vᵀ`` (default
            :data:`REDUCE_CHUNK_ELEMENTS`).
        extra: A gradient ``(*lead, H, Q, N_k)`` that reached the probabilities directly
            (eager attention that also used them otherwise), added before the ReLU.

    Returns:
        ``(*lead, N_k)`` in float32: the sums over queries are accumulated in float32.
    """
    if chunk_elements is None:
        chunk_elements = REDUCE_CHUNK_ELEMENTS
    if query is not None:
        grad_output = grad_output[..., query : query + 1, :]
        extra = None if extra is None else extra[..., query : query + 1, :]
    if rows is not None:  # (…, B·H, Q, d) → (…, B, H, Q, d)
        grad_output = grad_output.unflatten(-3, (rows, -1))
        value = value.unflatten(-3, (rows, -1))
        extra = None if extra is None else extra.unflatten(-3, (rows, -1))
    heads, n_query = grad_output.shape[-3], grad_output.shape[-2]
    kv_heads = value.shape[-3]
    if kv_heads != heads:
        if heads % kv_heads:
            raise CaptureError(
                f"The attention has {heads} query heads but {kv_heads} key/value heads."
            )
        # Query head h uses value head h // group (what enable_gqa's repeat_interleave does).
        grad_output = grad_output.unflatten(-3, (kv_heads, heads // kv_heads))
        value = value.unsqueeze(-3)
    value_t = value.transpose(-2, -1).to(grad_output.dtype)
    n_keys = value.shape[-2]
    lead = grad_output[..., 0, :].numel() // grad_output.shape[-1]  # all but (Q, d)
    step = max(1, min(n_query, chunk_elements // max(1, lead * n_keys)))
    total: Optional[Tensor] = None
    for start in range(0, n_query, step):
        part = grad_output[..., start : start + step, :] @ value_t
        if extra is not None:
            part = part + extra[..., start : start + step, :].to(part.dtype)
        part = part.clamp_(min=0).sum(dim=-2, dtype=torch.float32)
        total = part if total is None else total.add_(part)
    assert total is not None
    if kv_heads != heads:
        total = total.flatten(-3, -2)
    return total.sum(dim=-2) / (heads * n_query)


def prune_direct(records: Sequence[AttentionRecord], roots: Sequence[Tensor]) -> None:
    """Drop the :attr:`~AttentionRecord.direct` leaves that ``roots`` do not depend on.

    Walks the autograd graph of ``roots`` (a block's output: a few dozen nodes, since the
    block's graph starts at its attention output) looking for each direct leaf.
    """
    pending: List[AttentionRecord] = [r for r in records if r.direct is not None]
    if not pending:
        return
    from torch.autograd.graph import get_gradient_edge

    stack: List[Any] = [t.grad_fn for t in roots if t.grad_fn is not None]
    seen: Dict[int, Any] = {}
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node  # kept alive so that ids stay unique during the walk
        stack.extend(next_node for next_node, _ in node.next_functions)
    for record in pending:
        direct = record.direct
        assert direct is not None
        if id(get_gradient_edge(direct).node) not in seen:
            record.drop_direct()
