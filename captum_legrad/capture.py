"""Scoped capture of attention probabilities and residual streams.

Fused attention (``F.scaled_dot_product_attention``) never materialises the attention
probabilities, so while an attention module that LeGrad needs runs, an
:class:`AttentionRecorder` (a ``TorchFunctionMode``) computes that one call explicitly,
``softmax(q kᵀ · scale + mask) · v``, and keeps the probabilities: the tensor that is
multiplied with ``v`` and therefore on the autograd path to the block output. Eager
implementations that call ``softmax`` themselves are recorded as they are.

Everything is scoped to the call: forward hooks push and pop the recorder around the
module's own forward, act only in the calling thread (:class:`~captum_legrad.hooks.ScopedHooks`)
and are all removed when the call ends, also when it raises. No flag, attribute,
forward method or parameter of the model is changed, nothing is patched process-wide.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .errors import CaptureError
from .hooks import ScopedHooks, mode_stack_guard
from .lean import (
    MATMUL_FUNCTIONS,
    LeanRecord,
    LeanRecorder,
    Record,
    compact_value,
    eager_probabilities,
    leaf,
    linear_input_grad_hooks,
    mha_projections,
    mlp_output_linear,
    prune_probabilities,
)
from .spec import ViTSpec

__all__ = [
    "AttentionRecorder",
    "ValueRecorder",
    "check_route",
    "explicit_sdpa",
    "explicit_mha",
    "record_attention",
    "capture_blocks",
    "Captured",
    "ROUTES",
]

#: How the attention gradient is obtained: ``"lean"`` (from the attention output, the
#: probabilities never materialised; :mod:`captum_legrad.lean`) or ``"explicit"`` (the
#: probabilities computed explicitly and differentiated).
ROUTES = ("lean", "explicit")


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
    n_q, n_k = query.size(-2), key.size(-2)
    scale_factor = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    if enable_gqa and key.size(-3) != query.size(-3):
        repeats = query.size(-3) // key.size(-3)
        key = key.repeat_interleave(repeats, dim=-3)
        value = value.repeat_interleave(repeats, dim=-3)
    scores = (query @ key.transpose(-2, -1)) * scale_factor
    if is_causal:
        keep = torch.ones(n_q, n_k, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    if is_causal or attn_mask is not None:
        # Rows whose keys are all masked (left padding) give zeros, as the fused kernel does.
        dead = scores.amax(dim=-1, keepdim=True) == float("-inf")
        if bool(dead.any()):
            probs = scores.masked_fill(dead, 0.0).softmax(dim=-1).masked_fill(dead, 0.0)
        else:
            probs = scores.softmax(dim=-1)
    else:
        probs = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ value, probs


def explicit_mha(
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
) -> Tuple[Tensor, Optional[Tensor], Tensor]:
    """``F.multi_head_attention_forward`` (what ``nn.MultiheadAttention`` calls) written out.

    Same arguments (sequence-first ``(L, B, E)`` tensors); returns ``(output, weights,
    probabilities)`` where ``(output, weights)`` is what the fused function returns and
    ``probabilities`` ``(B, H, L, S)`` is the tensor multiplied with the values.
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
    src_len = key.shape[0]
    head_dim = embed_dim // num_heads
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
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(head_dim))
    if attn_mask is not None:
        if attn_mask.dim() == 3:
            attn_mask = attn_mask.view(batch, num_heads, tgt_len, src_len)
        if attn_mask.dtype == torch.bool:  # True = not allowed (opposite of SDPA)
            scores = scores.masked_fill(attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    elif is_causal:
        keep = torch.ones(tgt_len, src_len, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if key_padding_mask is not None:
        padding = key_padding_mask.view(batch, 1, 1, src_len)
        if padding.dtype == torch.bool:
            scores = scores.masked_fill(padding, float("-inf"))
        else:
            scores = scores + padding
    probs = scores.softmax(dim=-1)
    if training and dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    out = (probs @ v).permute(2, 0, 1, 3).reshape(tgt_len, batch, embed_dim)
    out = F.linear(out, out_proj_weight, out_proj_bias)
    weights: Optional[Tensor] = None
    if need_weights:
        weights = probs.mean(dim=1) if average_attn_weights else probs
    if unbatched:
        out = out.squeeze(1)
        weights = weights.squeeze(0) if weights is not None else None
    return out, weights, probs


class ValueRecorder(TorchFunctionMode):
    """Keeps the value operand of the last attention product computed while it is active
    (``F.scaled_dot_product_attention``'s ``value``, or the right operand of ``matmul``),
    and switches gradients off like :class:`~captum_legrad.lean.LeanRecorder`: the lean
    route of :attr:`~captum_legrad.spec.ViTSpec.product_inputs`, where the attention
    output becomes a leaf at the input of another module."""

    def __init__(self) -> None:
        super().__init__()
        self.value: Optional[Tensor] = None

    def __enter__(self) -> ValueRecorder:
        self.value = None
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
            self.value = args[2] if len(args) > 2 else kwargs["value"]
        elif func in MATMUL_FUNCTIONS and len(args) > 1 and isinstance(args[1], Tensor):
            self.value = args[1]
        return func(*args, **kwargs)


def _product_record(recorder: ValueRecorder, output: Tensor, where: str) -> LeanRecord:
    """The lean record of an attention output ``O = A·V`` ``(B, H, Q, d)`` met at the input
    of a module, with the ``V`` the recorder kept."""
    value = recorder.value
    if (
        value is None
        or output.dim() != value.dim()
        or output.shape[:-2] != value.shape[:-2]
        or output.shape[-1] != value.shape[-1]
    ):
        seen = "no value" if value is None else f"a value of shape {tuple(value.shape)}"
        raise CaptureError(
            f"{where} received {tuple(output.shape)} as its input, and the attention saw "
            f"{seen}: the input is not the attention output O = A·V whose V was recorded."
        )
    return LeanRecord(leaf(output), compact_value(value))


def check_route(spec: ViTSpec, route: str) -> None:
    """Refuse ``route="explicit"`` for a spec with :attr:`~ViTSpec.product_inputs`.

    Raises:
        ValueError: the route cannot explain the model.
    """
    if route == "explicit" and spec.product_inputs:
        raise ValueError(
            f"route='explicit' cannot explain blocks {sorted(spec.product_inputs)} of this "
            f"{spec.family} model: their attention matrix (differential attention, "
            "A = softmax1 - lambda * softmax2) is never computed as one tensor, so there is "
            "nothing explicit to differentiate. Use the lean route (route='lean', the "
            "default): it differentiates A exactly through dO·Vᵀ (docs/method.md)."
        )


class AttentionRecorder(TorchFunctionMode):
    """Records the attention probabilities computed while it is active.

    ``F.scaled_dot_product_attention`` calls are replaced by :func:`explicit_sdpa`,
    ``F.multi_head_attention_forward`` calls (``nn.MultiheadAttention``) by
    :func:`explicit_mha`; 4-D ``softmax`` results (eager attention) are recorded unchanged.
    """

    def __init__(self, records: List[Tensor]) -> None:
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
        if func is F.scaled_dot_product_attention:
            out, probs = explicit_sdpa(*args, **kwargs)
            self.records.append(probs)
            return out
        if func is F.multi_head_attention_forward:
            out, weights, probs = explicit_mha(*args, **kwargs)
            self.records.append(probs)
            return out, weights
        result = func(*args, **kwargs)
        if eager_probabilities(func, result):
            self.records.append(result)
        return result


@contextmanager
def record_attention(
    modules: Sequence[nn.Module],
    route: str = "explicit",
    outputs: Sequence[bool] = (),
    products: Sequence[Optional[nn.Module]] = (),
) -> Iterator[List[List[Record]]]:
    """Record the attention each of ``modules`` computes in its forward.

    Yields one list per module, filled in call order while the context is open. With
    ``route="explicit"`` the records are the probabilities (tensors on the graph); with
    ``route="lean"`` they are :class:`~captum_legrad.lean.LeanRecord` s (attention output
    as a leaf, and ``V``), or the probabilities as a leaf where an eager implementation
    uses them otherwise than in one product with ``V``. ``outputs[i]`` true: module
    ``i``'s output *is* the attention (``ViTSpec.output_attentions``) and is recorded as it
    is (on the lean route as a leaf that the rest of the block computes from).
    ``products[i]`` a module: module ``i``'s attention output ``O = A·V`` is the first input
    of that module (``ViTSpec.product_inputs``); lean route only, recorded as a
    :class:`~captum_legrad.lean.LeanRecord` with the ``V`` of the last attention product.
    """
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}.")
    records: List[List[Record]] = [[] for _ in modules]
    recorder_type = LeanRecorder if route == "lean" else AttentionRecorder
    as_output = list(outputs) + [False] * (len(modules) - len(outputs))
    at_input = list(products) + [None] * (len(modules) - len(products))
    if route != "lean" and any(m is not None for m in at_input):
        raise ValueError(
            "Attention outputs recorded at a module's input (ViTSpec.product_inputs) need "
            "route='lean'."
        )

    def keep(sink: List[Record]) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if not isinstance(output, Tensor):
                return None
            if route == "lean":
                output = leaf(output)  # the rest of the block computes from it
            sink.append(output)
            return output

        return hook

    def at(recorder: ValueRecorder, sink: List[Record], where: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Tuple[Any, ...]) -> Any:
            if not args or not isinstance(args[0], Tensor) or recorder.value is None:
                return None  # not inside the attention's own forward
            record = _product_record(recorder, args[0], where)
            recorder.value = None
            sink.append(record)
            return (record.output, *args[1:])

        return hook

    def enter(recorder: TorchFunctionMode) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            recorder.__enter__()

        return hook

    def leave(recorder: TorchFunctionMode) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            recorder.__exit__(None, None, None)

        return hook

    with mode_stack_guard(), ScopedHooks() as hooks:
        for module, sink, output, product in zip(modules, records, as_output, at_input):
            if output:
                hooks.forward(module, keep(sink))
                continue
            recorder: TorchFunctionMode
            if product is not None:
                values = ValueRecorder()
                hooks.forward_pre(product, at(values, sink, type(product).__name__))
                recorder = values
            else:
                recorder = recorder_type(sink)  # type: ignore[arg-type]
            hooks.forward_pre(module, enter(recorder))
            hooks.forward(module, leave(recorder), always_call=True)
        yield records


@dataclass
class Captured:
    """What one forward through the model left behind for LeGrad.

    ``tokens[i]`` is ``Z`` of the i-th selected block (batch-first); with
    ``differentiable=True`` it is on the autograd graph back to that block's own
    attention ``attentions[i]`` (and to nothing earlier: block inputs are cut).
    """

    tokens: List[Tensor] = field(default_factory=list)
    attentions: List[List[Record]] = field(default_factory=list)


@contextmanager
def capture_blocks(
    spec: ViTSpec,
    layers: Sequence[int],
    *,
    differentiable: bool,
    route: str = "explicit",
    token_mean_readout: bool = False,
) -> Iterator[Captured]:
    """Hook ``spec``'s blocks for one forward and collect ``Z^l`` (and ``A^l``).

    Gradients are switched on only inside the selected blocks (and only when
    ``differentiable``); each selected block's input is cut from the graph with
    ``detach().requires_grad_()``, so ``∂Z^l/∂A^m = 0`` for ``m ≠ l`` and earlier
    blocks build no graph at all. Block outputs are never changed, so the model
    computes what it always computes.

    With ``route="lean"`` a selected block runs without gradients up to its attention
    call, whose output becomes the leaf the block's graph starts from
    (:class:`~captum_legrad.lean.LeanRecorder`); the cut input then needs no grad. If
    also ``token_mean_readout`` (the scores depend on each ``Z^l`` only through its mean
    over tokens), the backward through each known block's last MLP linear takes one row
    per sample; every ``nn.Linear`` of a selected block computes only its input gradient
    (:func:`~captum_legrad.lean.linear_input_grad_hooks`).
    """
    lean = route == "lean"
    selected = {layer: slot for slot, layer in enumerate(layers)}
    captured = Captured(tokens=[torch.empty(0)] * len(layers))
    seen = [False] * len(layers)

    def root_pre_hook(module: nn.Module, args: Any) -> None:
        torch.set_grad_enabled(False)

    def block_pre_hook(layer: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
            differentiate = differentiable and layer in selected
            torch.set_grad_enabled(differentiate and not lean)
            if not differentiate:
                return None
            tokens = spec.tokens
            value = tokens.get(args, kwargs)
            cut = value.detach() if lean else value.detach().requires_grad_()
            return tokens.replace(args, kwargs, cut)

        return hook

    def block_hook(layer: int) -> Callable[..., None]:
        slot = selected[layer]

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            tokens = output[0] if isinstance(output, (tuple, list)) else output
            if not spec.batch_first:
                tokens = tokens.transpose(0, 1)
            captured.tokens[slot] = tokens if differentiable else tokens.detach()
            seen[slot] = True
            if lean and differentiable:
                prune_probabilities(captured.attentions[slot], [tokens])

        return hook

    def block_post_hook(module: nn.Module, args: Any, output: Any) -> None:
        torch.set_grad_enabled(False)

    attention_modules = [spec.attentions[layer] for layer in layers] if differentiable else []
    outputs = [layer in spec.output_attentions for layer in layers]
    products = [spec.product_inputs.get(layer) for layer in layers] if differentiable else []
    if differentiable:
        check_route(spec, route)
    with (
        record_attention(attention_modules, route, outputs, products) as records,
        ScopedHooks() as hooks,
    ):
        hooks.forward_pre(spec.root, root_pre_hook)
        linears: Set[int] = set()
        for index, block in enumerate(spec.blocks):
            hooks.forward_pre(block, block_pre_hook(index), with_kwargs=True)
            if index in selected:
                hooks.forward(block, block_hook(index))
                if lean and differentiable:
                    shared_row = mlp_output_linear(block) if token_mean_readout else None
                    for linear in block.modules():
                        if type(linear) is not nn.Linear or id(linear) in linears:
                            continue  # a linear shared between blocks is hooked once
                        linears.add(id(linear))
                        token_dim = None
                        if linear is shared_row:
                            token_dim = 1 if spec.batch_first else 0
                        pre_hook, hook = linear_input_grad_hooks(token_dim)
                        hooks.forward_pre(linear, pre_hook)
                        hooks.forward(linear, hook, always_call=True)
            hooks.forward(block, block_post_hook)
        captured.attentions = records
        yield captured
    missing = [layers[slot] for slot, ok in enumerate(seen) if not ok]
    if missing:
        raise CaptureError(
            f"Blocks {missing} of the {spec.family} model did not run during the forward; "
            "check that forward_func calls the model these blocks belong to."
        )
