"""Attention calls: what LeGrad recognises as attention, written once for every route.

Three kinds of call compute attention probabilities ``A = softmax(q kᵀ · scale + mask)``:

* ``F.scaled_dot_product_attention`` (fused; :data:`AttentionKind.FUSED`),
* ``F.multi_head_attention_forward`` (what ``nn.MultiheadAttention`` calls;
  :data:`AttentionKind.MULTIHEAD`),
* an eager ``softmax`` whose result is 4-D ``(B, H, Q, N_k)`` or 3-D (heads flattened into
  the batch) (:data:`AttentionKind.EAGER`); eager code then multiplies it with ``V`` in a
  ``matmul`` / ``bmm`` (:data:`PRODUCTS`), possibly through ``to`` / ``dropout``
  (:data:`PASS_THROUGH`).

:func:`attention_kind` classifies a call; every recorder (:mod:`.recorders`) and the
custom-ViT helper (:mod:`captum_legrad.custom`) ask it. :class:`SdpaCall` and
:class:`MultiheadCall` bind the two functions' arguments once; :func:`additive_mask` is the
one mask resolver; :func:`explicit_sdpa` is the fused function written out.

**Mask convention.** Inside this package a mask is *additive*: a float tensor broadcastable
to the scores ``(B, H, Q, N_k)``, ``0`` where a key may be attended and ``-inf`` where it
may not (other values are added to the scores as they are). The callers' boolean masks
have opposite meanings: ``F.scaled_dot_product_attention`` keeps ``True`` positions,
``nn.MultiheadAttention`` (``attn_mask`` and ``key_padding_mask``) masks them out;
:func:`additive_mask` takes which one it is told (``true_means``) and returns the additive
form.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import CaptureError

__all__ = [
    "AttentionKind",
    "attention_kind",
    "is_attention",
    "PRODUCTS",
    "PASS_THROUGH",
    "SdpaCall",
    "MultiheadCall",
    "additive_mask",
    "masked_softmax",
    "explicit_sdpa",
]


class AttentionKind(enum.Enum):
    """How a torch function call computes attention probabilities."""

    #: ``F.scaled_dot_product_attention``: the probabilities are never returned.
    FUSED = "scaled_dot_product_attention"
    #: ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``).
    MULTIHEAD = "multi_head_attention_forward"
    #: An eager ``softmax`` over 3-D / 4-D scores: its result *is* the probabilities.
    EAGER = "softmax"


_SOFTMAX: Tuple[Callable[..., Any], ...] = (torch.Tensor.softmax, torch.softmax, F.softmax)

#: The products eager attention forms ``A·V`` with.
PRODUCTS: Tuple[Callable[..., Any], ...] = (
    torch.matmul,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.bmm,
    torch.Tensor.bmm,
)

#: Ops that eager attention applies to the probabilities before the product with ``V``.
PASS_THROUGH: Tuple[Callable[..., Any], ...] = (
    torch.Tensor.to,
    torch.Tensor.type_as,
    torch.Tensor.contiguous,
    F.dropout,
    torch.dropout,
)


def attention_kind(func: Callable[..., Any], result: Any = None) -> Optional[AttentionKind]:
    """The kind of attention ``func`` computes, or ``None``.

    The fused and multi-head functions are recognised by ``func`` alone (before the call);
    an eager softmax needs its ``result`` (after the call): it is attention when the result
    is a 3-D or 4-D tensor.
    """
    if func is F.scaled_dot_product_attention:
        return AttentionKind.FUSED
    if func is F.multi_head_attention_forward:
        return AttentionKind.MULTIHEAD
    if func in _SOFTMAX and isinstance(result, Tensor) and result.dim() in (3, 4):
        return AttentionKind.EAGER
    return None


def is_attention(func: Callable[..., Any], result: Any) -> bool:
    """Whether the call of ``func`` that returned ``result`` computed attention."""
    return attention_kind(func, result) is not None


def _bind(names: Sequence[str], args: Sequence[Any], kwargs: Dict[str, Any]) -> Dict[str, Any]:
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def masked_softmax(scores: Tensor, mask: Optional[Tensor]) -> Tensor:
    """``softmax(scores + mask)`` over the keys; a query row whose keys are all masked gets
    zero probabilities, as the fused kernel gives (left padding)."""
    if mask is None:
        return scores.softmax(dim=-1)
    scores = scores + mask
    dead = scores.amax(dim=-1, keepdim=True) == float("-inf")
    if bool(dead.any()):
        return scores.masked_fill(dead, 0.0).softmax(dim=-1).masked_fill(dead, 0.0)
    return scores.softmax(dim=-1)


def additive_mask(
    mask: Optional[Tensor],
    *,
    true_means: str,
    dtype: torch.dtype,
    device: torch.device,
    is_causal: bool = False,
    queries: int = 0,
    keys: int = 0,
    padding: Optional[Tensor] = None,
) -> Optional[Tensor]:
    """The attention masks of one call as one additive mask (the module's convention).

    Args:
        mask: The call's ``attn_mask``: boolean or additive (float), or None.
        true_means: What ``True`` means in a boolean ``mask`` / ``padding``: ``"keep"``
            (``F.scaled_dot_product_attention``) or ``"drop"`` (``nn.MultiheadAttention``).
        dtype: The scores' dtype.
        device: The scores' device.
        is_causal: Mask the keys after each query (``queries × keys``, lower triangle kept).
        queries: Query count (with ``is_causal``).
        keys: Key count (with ``is_causal``).
        padding: ``(B, 1, 1, N_k)`` key-padding mask (boolean or additive), added.

    Returns:
        None when nothing is masked, else a float mask broadcastable to the scores.
    """
    if true_means not in ("keep", "drop"):
        raise ValueError(f"true_means must be 'keep' or 'drop', got {true_means!r}.")
    parts = []
    for part in (mask, padding):
        if part is None:
            continue
        if part.dtype == torch.bool:
            dropped = ~part if true_means == "keep" else part
            part = torch.zeros(part.shape, dtype=dtype, device=device).masked_fill(
                dropped, float("-inf")
            )
        parts.append(part.to(dtype))
    if is_causal:
        keep = torch.ones(queries, keys, dtype=torch.bool, device=device).tril()
        parts.append(
            torch.zeros(queries, keys, dtype=dtype, device=device).masked_fill(~keep, float("-inf"))
        )
    if not parts:
        return None
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


@dataclass
class SdpaCall:
    """The arguments of one ``F.scaled_dot_product_attention`` call, bound by name."""

    query: Tensor
    key: Tensor
    value: Tensor
    attn_mask: Optional[Tensor] = None
    dropout_p: float = 0.0
    is_causal: bool = False
    scale: Optional[float] = None
    enable_gqa: bool = False

    @classmethod
    def bind(cls, args: Sequence[Any], kwargs: Dict[str, Any]) -> SdpaCall:
        """The call ``F.scaled_dot_product_attention(*args, **kwargs)``'s arguments."""
        names = [f.name for f in fields(cls)]
        bound = _bind(names, args, kwargs)
        return cls(**{name: bound[name] for name in names if name in bound})

    def mask(self) -> Optional[Tensor]:
        """The call's masks as one additive mask (``True`` keeps a key)."""
        return additive_mask(
            self.attn_mask,
            true_means="keep",
            dtype=self.query.dtype,
            device=self.query.device,
            is_causal=self.is_causal,
            queries=self.query.size(-2),
            keys=self.key.size(-2),
        )


def explicit_sdpa(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> Tuple[Tensor, Tensor]:
    """``F.scaled_dot_product_attention`` written out; returns ``(output, probabilities)``.

    Same arguments and semantics as the fused function (boolean masks keep ``True``
    positions, float masks are added, ``is_causal`` masks the upper triangle, a query row
    whose keys are all masked gets zero probabilities and output).
    """
    call = SdpaCall(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    scale_factor = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    if enable_gqa and key.size(-3) != query.size(-3):
        repeats = query.size(-3) // key.size(-3)
        key = key.repeat_interleave(repeats, dim=-3)
        value = value.repeat_interleave(repeats, dim=-3)
    scores = (query @ key.transpose(-2, -1)) * scale_factor
    probs = masked_softmax(scores, call.mask())
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ value, probs


_MHA_DEFAULTS: Dict[str, Any] = {
    "training": True,
    "key_padding_mask": None,
    "need_weights": True,
    "attn_mask": None,
    "use_separate_proj_weight": False,
    "q_proj_weight": None,
    "k_proj_weight": None,
    "v_proj_weight": None,
    "static_k": None,
    "static_v": None,
    "average_attn_weights": True,
    "is_causal": False,
}
_MHA_NAMES = (
    "query",
    "key",
    "value",
    "embed_dim_to_check",
    "num_heads",
    "in_proj_weight",
    "in_proj_bias",
    "bias_k",
    "bias_v",
    "add_zero_attn",
    "dropout_p",
    "out_proj_weight",
    "out_proj_bias",
    *_MHA_DEFAULTS,
)


class MultiheadCall:
    """One ``F.multi_head_attention_forward`` call (``nn.MultiheadAttention``), normalised.

    :meth:`bind` takes the call's 25 arguments however they were passed; the inputs are
    then sequence-first and batched (``(L, B, E)``: an unbatched call's inputs get a batch
    of one, undone by :meth:`output`). :meth:`projections` gives ``q, k, v`` ``(B, H, L,
    d)``, :meth:`mask` the masks as one additive mask, :meth:`output` the module's output
    from the attention output ``O`` ``(B, H, L, d)`` and :meth:`weights` the attention
    weights the module returns.

    Raises:
        CaptureError: the module uses ``add_bias_kv``, ``add_zero_attn`` or static keys,
            which add keys that are not tokens.
    """

    def __init__(self, arguments: Dict[str, Any]) -> None:
        self.arguments = {**_MHA_DEFAULTS, **arguments}
        a = self.arguments
        if a["bias_k"] is not None or a["bias_v"] is not None or a["add_zero_attn"]:
            raise self.unsupported()
        if a["static_k"] is not None or a["static_v"] is not None:
            raise self.unsupported()
        query, key, value = a["query"], a["key"], a["value"]
        self.unbatched = query.dim() == 2
        padding = a["key_padding_mask"]
        if self.unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if padding is not None:
                padding = padding.unsqueeze(0)
        self.query, self.key, self.value, self.padding = query, key, value, padding
        self.num_heads: int = int(a["num_heads"])
        self.need_weights: bool = bool(a["need_weights"])
        self.dropout: float = float(a["dropout_p"]) if a["training"] else 0.0

    @staticmethod
    def unsupported() -> CaptureError:
        return CaptureError(
            "nn.MultiheadAttention with add_bias_kv, add_zero_attn or static keys is not "
            "supported by LeGrad's attention capture: those keys are not tokens of the image."
        )

    @classmethod
    def bind(cls, args: Sequence[Any], kwargs: Dict[str, Any]) -> MultiheadCall:
        """The call ``F.multi_head_attention_forward(*args, **kwargs)``, normalised."""
        return cls(_bind(_MHA_NAMES, args, kwargs))

    def projections(self) -> Tuple[Tensor, Tensor, Tensor]:
        """``q, k, v`` ``(B, H, L, E/H)`` from the sequence-first inputs."""
        a = self.arguments
        tgt_len, batch, embed_dim = self.query.shape
        src_len = self.key.shape[0]
        heads = self.num_heads
        head_dim = embed_dim // heads
        if a["use_separate_proj_weight"]:
            weights: Tuple[Tensor, ...] = (
                a["q_proj_weight"],
                a["k_proj_weight"],
                a["v_proj_weight"],
            )
        else:
            weights = tuple(a["in_proj_weight"].chunk(3))
        bias = a["in_proj_bias"]
        biases: Tuple[Optional[Tensor], ...] = (
            tuple(bias.chunk(3)) if bias is not None else (None, None, None)
        )
        q = F.linear(self.query, weights[0], biases[0])
        k = F.linear(self.key, weights[1], biases[1])
        v = F.linear(self.value, weights[2], biases[2])
        q = q.view(tgt_len, batch, heads, head_dim).permute(1, 2, 0, 3)
        k = k.view(src_len, batch, heads, head_dim).permute(1, 2, 0, 3)
        v = v.view(src_len, batch, heads, head_dim).permute(1, 2, 0, 3)
        return q, k, v

    def mask(self, dtype: torch.dtype, device: torch.device) -> Optional[Tensor]:
        """``attn_mask`` (or ``is_causal`` without one) and ``key_padding_mask`` as one
        additive mask; ``True`` masks a key out, as ``nn.MultiheadAttention`` reads it."""
        a = self.arguments
        tgt_len, batch, _ = self.query.shape
        src_len = self.key.shape[0]
        attn_mask = a["attn_mask"]
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.view(batch, self.num_heads, tgt_len, src_len)
        padding = self.padding
        if padding is not None:
            padding = padding.view(batch, 1, 1, src_len)
        return additive_mask(
            attn_mask,
            true_means="drop",
            dtype=dtype,
            device=device,
            is_causal=bool(a["is_causal"]) and attn_mask is None,
            queries=tgt_len,
            keys=src_len,
            padding=padding,
        )

    def output(self, attention_output: Tensor) -> Tensor:
        """The module's output from ``O`` ``(B, H, L, d)``: heads joined, ``out_proj``."""
        a = self.arguments
        tgt_len, batch, embed_dim = self.query.shape
        out = attention_output.permute(2, 0, 1, 3).reshape(tgt_len, batch, embed_dim)
        out = F.linear(out, a["out_proj_weight"], a["out_proj_bias"])
        return out.squeeze(1) if self.unbatched else out

    def weights(self, probabilities: Optional[Tensor]) -> Optional[Tensor]:
        """The attention weights the module returns (``None`` unless ``need_weights``)."""
        if not self.need_weights or probabilities is None:
            return None
        weights = (
            probabilities.mean(dim=1) if self.arguments["average_attn_weights"] else probabilities
        )
        return weights.squeeze(0) if self.unbatched else weights
