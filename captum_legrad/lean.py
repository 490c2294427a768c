"""The lean route: LeGrad without materialising the attention probabilities.

Every selected block's input is cut from the graph, so block ``l``'s attention
probabilities ``A^l`` reach the score ``s^l`` only through the attention output
``O^l = A^l V^l``. Hence, exactly,

    ∂s^l/∂A^l = (∂s^l/∂O^l) · V^lᵀ.

While an attention module that LeGrad needs runs, a :class:`LeanRecorder` (a
``TorchFunctionMode`` pushed by a thread-scoped forward hook) lets the model's own
attention call run unchanged, without a graph, and hands the rest of the module a fresh
leaf ``O`` (``detach().requires_grad_()``) in its place; ``V`` is kept. The backward then
stops at ``O`` and never enters the attention; :func:`reduce_lean` forms
``mean over heads and queries of ReLU(dO · Vᵀ)`` in query chunks, so no ``(N × N)``
matrix per head is ever held. What the model computes is unchanged.

* ``F.scaled_dot_product_attention``: the call itself runs (fused kernels kept); masks,
  ``is_causal``, ``scale`` and ``dropout_p`` act in the forward only, since the identity
  holds for every entry of ``A`` whatever its value; ``enable_gqa`` keeps ``V`` with its
  ``H_kv`` heads and :func:`reduce_lean` pairs each query head with its key/value head.
* ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``): computed by
  :func:`lean_mha` with ``F.scaled_dot_product_attention``; when the caller asks for the
  attention weights (``need_weights=True``) the probabilities are computed explicitly and
  recorded as a leaf instead (the weights might be used), which is exact too.
* Eager attention (``softmax`` then ``matmul`` with ``V``, e.g. transformers' ``eager``):
  the 4-D (or 3-D, heads flattened) ``softmax`` result is made a leaf; when the next
  ``matmul`` / ``bmm`` multiplies it (through ``to`` / ``dropout``) with ``V``, that product
  becomes the leaf ``O``. The probabilities stay a leaf until the block has run; if its
  output still depends on them otherwise (:func:`prune_probabilities` walks the block's
  graph), their direct gradient is added to ``dO · Vᵀ`` before the ReLU, else they are
  dropped. An eager softmax never followed by such a product stays the recorded leaf (the
  explicit route's record). Exact in every case.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .errors import CaptureError

__all__ = [
    "LeanRecord",
    "Record",
    "LeanRecorder",
    "MATMUL_FUNCTIONS",
    "compact_value",
    "record_keys",
    "eager_probabilities",
    "lean_mha",
    "mha_projections",
    "reduce_lean",
    "prune_probabilities",
    "REDUCE_CHUNK_ELEMENTS",
    "mlp_output_linear",
    "linear_input_grad_hooks",
]

#: Elements of one chunk of ``dO · Vᵀ`` (targets × batch × heads × queries × keys) in
#: :func:`reduce_lean`: 2**24 is 64 MiB in float32.
REDUCE_CHUNK_ELEMENTS = 1 << 24

_SOFTMAX: Tuple[Callable[..., Any], ...] = (torch.Tensor.softmax, torch.softmax, F.softmax)


def eager_probabilities(func: Callable[..., Any], result: Any) -> bool:
    """Whether ``func`` returning ``result`` formed eager attention probabilities: a
    ``softmax`` whose result is 4-D ``(B, H, Q, N_k)`` or 3-D (heads flattened into the
    batch)."""
    return func in _SOFTMAX and isinstance(result, Tensor) and result.dim() in (3, 4)


#: The products eager attention forms ``A·V`` with.
MATMUL_FUNCTIONS: Tuple[Callable[..., Any], ...] = (
    torch.matmul,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.bmm,
    torch.Tensor.bmm,
)
#: Ops that eager attention applies to the probabilities before the product with ``V``.
_PASS_THROUGH: Tuple[Callable[..., Any], ...] = (
    torch.Tensor.to,
    torch.Tensor.type_as,
    torch.Tensor.contiguous,
    F.dropout,
    torch.dropout,
)


@dataclass
class LeanRecord:
    """One attention call on the lean route.

    ``output`` is the attention output ``O`` ``(…, H, Q, d)`` as a leaf that requires
    grad (the rest of the module computes from it); ``value`` is ``V`` ``(…, H_kv, N_k,
    d)``, detached. ``∂s/∂A = (∂s/∂O) · Vᵀ``.
    """

    output: Tensor
    value: Tensor
    #: Eager attention: the probabilities' leaf, kept (after :func:`prune_probabilities`)
    #: only if the output depends on it besides through ``O``; its gradient then adds to
    #: ``dO · Vᵀ``.
    probabilities: Optional[Tensor] = None


#: What an attention call leaves for the backward: the probabilities ``A`` (a tensor on
#: the graph, explicit route and eager fallback) or a :class:`LeanRecord`.
Record = Union[Tensor, LeanRecord]


def record_keys(record: Record) -> int:
    """The number of attention keys of a record (``V``'s tokens on the lean route)."""
    return int(record.value.shape[-2] if isinstance(record, LeanRecord) else record.shape[-1])


def _argument(args: Sequence[Any], kwargs: Dict[str, Any], index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs[name]


def compact_value(value: Tensor) -> Tensor:
    """``value`` detached, copied if it views a larger buffer (timm's packed ``qkv``), so
    that keeping ``V`` does not keep ``Q`` and ``K`` alive."""
    value = value.detach()
    if value.untyped_storage().nbytes() > value.numel() * value.element_size():
        return value.clone()
    return value


def leaf(tensor: Tensor) -> Tensor:
    """``tensor`` as a new leaf requiring grad; gradients are switched on from here."""
    leaf = tensor.detach().requires_grad_()
    torch.set_grad_enabled(True)
    return leaf


def mha_projections(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    num_heads: int,
    in_proj_weight: Optional[Tensor],
    in_proj_bias: Optional[Tensor],
    use_separate_proj_weight: bool,
    q_proj_weight: Optional[Tensor],
    k_proj_weight: Optional[Tensor],
    v_proj_weight: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Tensor]:
    """Sequence-first ``(L, B, E)`` inputs → ``q, k, v`` ``(B, H, L, E/H)``."""
    tgt_len, batch, embed_dim = query.shape
    src_len = key.shape[0]
    head_dim = embed_dim // num_heads
    if use_separate_proj_weight:
        assert q_proj_weight is not None and k_proj_weight is not None
        assert v_proj_weight is not None
        weights: Tuple[Tensor, ...] = (q_proj_weight, k_proj_weight, v_proj_weight)
    else:
        assert in_proj_weight is not None
        weights = tuple(in_proj_weight.chunk(3))
    biases: Tuple[Optional[Tensor], ...] = (
        tuple(in_proj_bias.chunk(3)) if in_proj_bias is not None else (None, None, None)
    )
    q = F.linear(query, weights[0], biases[0])
    k = F.linear(key, weights[1], biases[1])
    v = F.linear(value, weights[2], biases[2])
    q = q.view(tgt_len, batch, num_heads, head_dim).permute(1, 2, 0, 3)
    k = k.view(src_len, batch, num_heads, head_dim).permute(1, 2, 0, 3)
    v = v.view(src_len, batch, num_heads, head_dim).permute(1, 2, 0, 3)
    return q, k, v


def _mha_mask(
    attn_mask: Optional[Tensor],
    key_padding_mask: Optional[Tensor],
    is_causal: bool,
    shape: Tuple[int, int, int, int],
    dtype: torch.dtype,
    device: torch.device,
) -> Optional[Tensor]:
    """``nn.MultiheadAttention``'s masks (``True`` = not allowed) as one additive mask."""
    batch, heads, tgt_len, src_len = shape
    mask: Optional[Tensor] = None
    if attn_mask is not None:
        if attn_mask.dim() == 3:
            attn_mask = attn_mask.view(batch, heads, tgt_len, src_len)
        if attn_mask.dtype == torch.bool:
            mask = torch.zeros(attn_mask.shape, dtype=dtype, device=device)
            mask = mask.masked_fill(attn_mask, float("-inf"))
        else:
            mask = attn_mask.to(dtype)
    elif is_causal:
        keep = torch.ones(tgt_len, src_len, dtype=torch.bool, device=device).tril()
        mask = torch.zeros(tgt_len, src_len, dtype=dtype, device=device)
        mask = mask.masked_fill(~keep, float("-inf"))
    if key_padding_mask is not None:
        padding = key_padding_mask.view(batch, 1, 1, src_len)
        if padding.dtype == torch.bool:
            padding = torch.zeros(padding.shape, dtype=dtype, device=device).masked_fill(
                padding, float("-inf")
            )
        else:
            padding = padding.to(dtype)
        mask = padding if mask is None else mask + padding
    return mask


def lean_mha(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    embed_dim_to_check: int,
    num_heads: int,
    in_proj_weight: Optional[Tensor],
    in_proj_bias: Optional[Tensor],
    bias_k: Optional[Tensor],
    bias_v: Optional[Tensor],
    add_zero_attn: bool,
    dropout_p: float,
    out_proj_weight: Tensor,
    out_proj_bias: Optional[Tensor],
    training: bool = True,
    key_padding_mask: Optional[Tensor] = None,
    need_weights: bool = True,
    attn_mask: Optional[Tensor] = None,
    use_separate_proj_weight: bool = False,
    q_proj_weight: Optional[Tensor] = None,
    k_proj_weight: Optional[Tensor] = None,
    v_proj_weight: Optional[Tensor] = None,
    static_k: Optional[Tensor] = None,
    static_v: Optional[Tensor] = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> Tuple[Tensor, Optional[Tensor], Record]:
    """``F.multi_head_attention_forward`` on the lean route.

    Same arguments (sequence-first ``(L, B, E)`` tensors) and results as the fused
    function, plus the record: the projections run without a graph, ``O`` is computed by
    ``F.scaled_dot_product_attention`` and made a leaf. With ``need_weights=True`` the
    probabilities are computed explicitly and become the recorded leaf instead.
    """
    if bias_k is not None or bias_v is not None or add_zero_attn or static_k is not None:
        raise CaptureError(
            "nn.MultiheadAttention with add_bias_kv, add_zero_attn or static keys is not "
            "supported by LeGrad's attention capture."
        )
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, batch, embed_dim = query.shape
    with torch.no_grad():
        q, k, v = mha_projections(
            query,
            key,
            value,
            num_heads,
            in_proj_weight,
            in_proj_bias,
            use_separate_proj_weight,
            q_proj_weight,
            k_proj_weight,
            v_proj_weight,
        )
        mask = _mha_mask(
            attn_mask,
            key_padding_mask,
            is_causal,
            (batch, num_heads, tgt_len, k.shape[-2]),
            q.dtype,
            q.device,
        )
        dropout = dropout_p if training else 0.0
        probs: Optional[Tensor] = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
            probs = (scores if mask is None else scores + mask).softmax(dim=-1)
            if dropout > 0.0:
                probs = F.dropout(probs, p=dropout)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    record: Record
    weights: Optional[Tensor] = None
    if probs is not None:
        record = leaf(probs)
        out = record @ v
        weights = record.mean(dim=1) if average_attn_weights else record
    else:
        record = LeanRecord(leaf(out), compact_value(v))
        out = record.output
    out = out.permute(2, 0, 1, 3).reshape(tgt_len, batch, embed_dim)
    out = F.linear(out, out_proj_weight, out_proj_bias)
    if unbatched:
        out = out.squeeze(1)
        weights = weights.squeeze(0) if weights is not None else None
    return out, weights, record


class LeanRecorder(TorchFunctionMode):
    """Records the lean route's attention outputs while it is active (see the module doc).

    Entering it switches gradients off (the attention's inputs need no graph); the
    recorded leaf switches them on again for the rest of the block.
    """

    def __init__(self, records: List[Record]) -> None:
        super().__init__()
        self.records = records
        self._pending: Optional[Tensor] = None  # eager probabilities awaiting their matmul
        self._pending_slot = -1

    def __enter__(self) -> LeanRecorder:
        self._pending = None
        torch.set_grad_enabled(False)
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
        if func is F.scaled_dot_product_attention:
            value = _argument(args, kwargs, 2, "value")
            with torch.no_grad():
                out = func(*args, **kwargs)
            record = LeanRecord(leaf(out), compact_value(value))
            self.records.append(record)
            return record.output
        if func is F.multi_head_attention_forward:
            out, weights, mha_record = lean_mha(*args, **kwargs)
            self.records.append(mha_record)
            return out, weights
        pending = self._pending
        if pending is not None and args and args[0] is pending:
            if func in MATMUL_FUNCTIONS:
                with torch.no_grad():
                    out = func(*args, **kwargs)
                probs = self.records[self._pending_slot]
                assert isinstance(probs, Tensor)
                record = LeanRecord(leaf(out), compact_value(args[1]), probs)
                self.records[self._pending_slot] = record
                self._pending = None
                return record.output
            if func in _PASS_THROUGH:
                result = func(*args, **kwargs)
                self._pending = result if isinstance(result, Tensor) else None
                return result
        result = func(*args, **kwargs)
        if eager_probabilities(func, result):
            probs = leaf(result)
            self.records.append(probs)
            self._pending, self._pending_slot = probs, len(self.records) - 1
            return probs
        return result


def prune_probabilities(records: Sequence[Record], roots: Sequence[Tensor]) -> None:
    """Drop the probabilities of lean records that ``roots`` do not depend on directly.

    Walks the autograd graph of ``roots`` (a block's output: a few dozen nodes, since the
    block's graph starts at its attention output) looking for each probabilities leaf.
    """
    pending = [r for r in records if isinstance(r, LeanRecord) and r.probabilities is not None]
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
        assert record.probabilities is not None
        if id(get_gradient_edge(record.probabilities).node) not in seen:
            record.probabilities = None


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


# ------------------------------------------------------------------ rank-one MLP backward

#: Blocks whose output is ``x + t(W h + b)``: the last MLP linear (path below the block)
#: followed only by ops that act alike on every token (dropout in eval, LayerScale, drop
#: path, the residual add). Keyed by (top-level package, class name).
MLP_OUTPUT_LINEAR: Dict[Tuple[str, str], Tuple[str, ...]] = {
    ("timm", "Block"): ("mlp.fc2",),
    ("timm", "EvaBlock"): ("mlp.fc2",),
    ("open_clip", "ResidualAttentionBlock"): ("mlp.c_proj",),
    ("torchvision", "EncoderBlock"): ("mlp.3",),
    # transformers 5 (ViTMLP) and 4 (ViTOutput: dense, dropout, + residual)
    ("transformers", "ViTLayer"): ("mlp.fc2", "output.dense"),
    ("transformers", "CLIPEncoderLayer"): ("mlp.fc2",),
    ("transformers", "SiglipEncoderLayer"): ("mlp.fc2",),
    ("transformers", "Dinov2Layer"): ("mlp.fc2",),
    ("transformers", "Dinov2WithRegistersLayer"): ("mlp.fc2",),
}


def mlp_output_linear(block: nn.Module) -> Optional[nn.Linear]:
    """The ``nn.Linear`` whose output reaches ``block``'s output token-wise, if known.

    Returns ``None`` for unknown block classes, blocks in training mode (dropout acts
    differently on every token) and MLPs without such a linear (e.g. convolutions).
    """
    key = (type(block).__module__.split(".")[0], type(block).__name__)
    if block.training:
        return None
    for path in MLP_OUTPUT_LINEAR.get(key, ()):
        try:
            linear = block.get_submodule(path)
        except AttributeError:
            continue
        return linear if type(linear) is nn.Linear else None
    return None


class _LinearInputGrad(torch.autograd.Function):
    """A linear's output ``y = W x + b``, computed without a graph, put on the graph of its
    input only: the backward gives ``dX = dY · W`` (no weight or bias gradient, and ``x`` is
    not kept for one), or with ``token_dim`` the shared row ``mean_n(dY_n) · W`` broadcast
    to every token (see :func:`linear_input_grad_hooks`)."""

    @staticmethod
    def forward(
        ctx: Any, inputs: Tensor, output: Tensor, weight: Tensor, token_dim: Optional[int]
    ) -> Tensor:
        ctx.save_for_backward(weight)
        ctx.token_dim, ctx.input_shape = token_dim, inputs.shape
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], None, None, None]:
        (weight,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        weight = weight.to(grad.dtype)
        if ctx.token_dim is None:
            return grad @ weight, None, None, None
        row = grad.mean(dim=ctx.token_dim, keepdim=True) @ weight
        return row.expand(ctx.input_shape), None, None, None


def linear_input_grad_hooks(
    token_dim: Optional[int] = None,
) -> Tuple[Callable[..., Any], Callable[..., Any]]:
    """A forward pre-hook and a forward hook for an ``nn.Linear`` inside a selected block
    on the lean route: the same output, and a backward that computes only what LeGrad needs.

    The pre-hook runs the linear without a graph; the hook (registered with
    ``always_call=True``) restores the grad mode and, where gradients flow, returns the
    output through :class:`_LinearInputGrad`, whose backward is the input gradient
    ``dY · W``. No weight gradient is ever asked for (``autograd.grad`` asks only for the
    attention outputs), so the linear's input need not be kept for one: the forward keeps
    less memory (fewer fresh pages to fault in on every call).

    ``token_dim`` (the block's last MLP linear, ``pooling="mean"``): the score depends on
    ``Z^l`` only through its mean over tokens, so ``∂s/∂Z^l_n`` is the same for every token
    ``n``, and so is the gradient ``g`` at this linear's output ``y_n = W h_n + b``. Its input
    gradient ``Wᵀ g`` is then ``mean_n(dY_n) · W`` for every token: one row instead of ``N``.
    """
    modes: List[bool] = []  # grad mode before each (possibly nested) call of the linear

    def pre_hook(module: nn.Module, args: Tuple[Any, ...]) -> None:
        modes.append(torch.is_grad_enabled())
        torch.set_grad_enabled(False)

    def hook(module: nn.Module, args: Tuple[Any, ...], output: Any) -> Any:
        enabled = modes.pop() if modes else torch.is_grad_enabled()
        torch.set_grad_enabled(enabled)
        if not (enabled and isinstance(output, Tensor) and args):
            return None
        inputs = args[0]
        if not (isinstance(inputs, Tensor) and inputs.requires_grad):
            return None
        linear: Any = module
        return _LinearInputGrad.apply(inputs, output, linear.weight, token_dim)

    return pre_hook, hook
