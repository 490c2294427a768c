"""The LeGrad computation (SPEC §1), written once for every model family.

For the selected layers ``S`` and targets ``k``:

* ``s^l_k = readout(Z^l)[target_k]``, the layer's own tokens read out by the head;
* ``G^l_k = ∂s^l_k / ∂A^l``, only block ``l``'s own attention;
* ``E^l_k = mean over heads and query rows of max(G^l_k, 0)``, prefix keys dropped,
  reshaped to the patch grid.

All layers come from one forward and one backward per target: every selected block's
input is cut from the graph (:func:`~captum_legrad.capture.capture_blocks`), the
``Z^l`` are stacked along the batch axis through one readout call, and one
``autograd.grad`` of the summed scores w.r.t. all ``A^l`` gives every ``G^l`` at once
(``∂s^l/∂A^m = 0`` for ``m ≠ l`` because the block inputs are cut). Several targets
reuse the same graph with batched gradients.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .capture import ROUTES, capture_blocks, record_attention
from .errors import CaptureError
from .lean import LeanRecord, Record, prune_probabilities, reduce_lean
from .spec import ViTSpec

__all__ = [
    "ForwardResult",
    "run_forward",
    "layer_maps",
    "aggregate_layers",
    "upsample",
    "minmax_normalize",
    "empty_prompt_correction",
    "POOLINGS",
    "ROUTES",
]

#: Readouts for the per-layer score: the paper's mean over tokens, or the model's own.
POOLINGS = ("mean", "model")

#: Families whose ``pooling="mean"`` readout reads ``Z`` only through its mean over tokens
#: (the adapters'; a hand-made :class:`ViTSpec` is not assumed to).
TOKEN_MEAN_FAMILIES = ("timm", "open_clip", "hf", "torchvision")

#: ``(B, K)`` index tensors, one per non-batch output dimension, naming the targets.
TargetIndex = Tuple[Tensor, ...]


class ForwardResult:
    """Output of :func:`run_forward`: the per-layer scores and the attentions to differentiate."""

    def __init__(self, scores: Tensor, attentions: List[Record], per_layer_batch: bool) -> None:
        #: Per-layer scores ``(L, B, ...)``; targets index ``scores[l]`` as Captum indexes
        #: a model output.
        self.scores = scores
        #: Differentiated attentions, one record per layer, or a single one for
        #: attention-pool readouts (whose batch is ``L·B``): the probabilities ``(B, H, Q,
        #: N_k)`` (explicit route), or a :class:`~captum_legrad.lean.LeanRecord`.
        self.attentions = attentions
        self.per_layer_batch = per_layer_batch

    @property
    def output_shape(self) -> torch.Size:
        """Shape of one layer's scores, ``(B, ...)``: what ``target`` is checked against."""
        return self.scores.shape[1:]


def _single_record(records: List[Record], where: str) -> Record:
    if len(records) != 1:
        what = "no" if not records else f"{len(records)}"
        raise CaptureError(
            f"Expected one attention computation in {where} during the forward, saw {what}. "
            "LeGrad records F.scaled_dot_product_attention calls and 4-D softmax results; "
            "if this module computes attention another way, describe the model with a "
            "ViTSpec whose attention modules compute it one of these ways."
        )
    return records[0]


def run_forward(
    spec: ViTSpec,
    forward_func: Callable[..., Any],
    inputs: Tuple[Tensor, ...],
    additional_forward_args: Tuple[Any, ...],
    layers: Sequence[int],
    pooling: str,
    route: str = "lean",
) -> ForwardResult:
    """One forward with capture, then the per-layer readout, ready to differentiate.

    ``route`` (:data:`ROUTES`): ``"lean"`` records attention outputs and values (the
    probabilities are never materialised), ``"explicit"`` the probabilities.
    """
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}.")
    pooled_attention = spec.pool_attention is not None
    with torch.enable_grad():
        with capture_blocks(
            spec,
            layers,
            differentiable=not pooled_attention,
            route=route,
            token_mean_readout=pooling == "mean" and spec.family in TOKEN_MEAN_FAMILIES,
        ) as captured:
            # The output itself is not needed: scores come from the readout of each layer
            # (models returning ModelOutput objects are fine).
            forward_func(*inputs, *additional_forward_args)
    readout = spec.model_readout if pooling == "model" else spec.readout
    n_layers, batch = len(layers), inputs[0].shape[0]
    with torch.enable_grad():
        if pooled_attention:
            assert spec.pool_attention is not None
            tokens = torch.cat(captured.tokens)
            if route == "explicit":
                tokens.requires_grad_()
            with record_attention([spec.pool_attention], route) as records:
                scores = readout(tokens)
            prune_probabilities(records[0], [scores])
            attentions = [_single_record(records[0], type(spec.pool_attention).__name__)]
        else:
            if route == "lean":
                # One readout per layer: no stacked copy of every layer's tokens (memory).
                scores = torch.cat([readout(tokens) for tokens in captured.tokens])
                captured.tokens.clear()
            else:
                scores = readout(torch.cat(captured.tokens))
            attentions = [
                _single_record(records, f"block {layer} ({type(spec.attentions[layer]).__name__})")
                for layer, records in zip(layers, captured.attentions)
            ]
        scores = scores.reshape(n_layers, batch, *scores.shape[1:])
    return ForwardResult(scores, attentions, per_layer_batch=pooled_attention)


def _select(scores: Tensor, index: TargetIndex) -> Tensor:
    """``scores`` (L, B, ...) at ``index`` ((B, K) each) → (L, B, K)."""
    batch, k = index[0].shape
    rows = torch.arange(batch, device=scores.device).unsqueeze(1).expand(batch, k)
    where: Tuple[Any, ...] = (slice(None), rows, *index)
    return scores[where]


def _reduce(grad: Tensor, query: Optional[int] = None) -> Tensor:
    """``(…, H, Q, N_k)`` gradient → ``(…, N_k)``: ReLU, then mean over heads and queries.

    ``query`` keeps one query row only (CoCa's first latent). Reduced in float32, so
    half-precision models lose nothing in the averaging.
    """
    if query is not None:
        grad = grad[..., query : query + 1, :]
    return grad.clamp(min=0).float().mean(dim=(-3, -2))


def _split_heads(grad: Tensor, rows: int, batched: bool) -> Tensor:
    """Gradients of ``(rows·H, Q, N_k)`` records (attention computed with ``bmm`` on
    flattened heads, as transformers < 4.52 CLIP does) → ``(rows, H, Q, N_k)``."""
    if grad.dim() == (4 if batched else 3):
        return grad.unflatten(-3, (rows, -1))
    return grad


def _reduce_record(
    grad: Tensor,
    record: Record,
    rows: int,
    batched: bool,
    query: Optional[int],
    extra: Optional[Tensor] = None,
) -> Tensor:
    """The gradient w.r.t. one record → ``(k, rows, N_k)`` (``k = 1`` unless ``batched``).

    ``extra``: for a lean record of eager attention, the gradient that reached its
    probabilities directly.
    """
    if isinstance(record, LeanRecord):
        flat = grad.dim() == (4 if batched else 3)  # heads flattened into the batch
        reduced = reduce_lean(grad, record.value, query, rows if flat else None, extra=extra)
    else:
        reduced = _reduce(_split_heads(grad, rows, batched), query)
    return reduced if batched else reduced.unsqueeze(0)


def _target_keys(
    selected: Tensor, result: ForwardResult, query: Optional[int], retain: bool
) -> Tensor:
    """One backward for the ``k`` targets in ``selected`` (L, B, k) → ``(k, L, B, N_k)``."""
    n_layers, batch, k = selected.shape
    rows = n_layers * batch if result.per_layer_batch else batch
    inputs = [r.output if isinstance(r, LeanRecord) else r for r in result.attentions]
    # Eager attention whose probabilities something else used too: their direct gradient.
    direct: List[Tuple[int, Tensor]] = []
    for i, record in enumerate(result.attentions):
        probs = record.probabilities if isinstance(record, LeanRecord) else None
        if probs is not None:
            direct.append((i, probs))
    inputs += [p for _, p in direct]
    with torch.enable_grad():
        if k == 1:
            grads = torch.autograd.grad(
                selected.sum(), inputs, retain_graph=retain, allow_unused=bool(direct)
            )
        else:
            eye = torch.eye(k, dtype=selected.dtype, device=selected.device)
            grads = torch.autograd.grad(
                selected,
                inputs,
                grad_outputs=eye.view(k, 1, 1, k).expand(k, n_layers, batch, k),
                retain_graph=retain,
                is_grads_batched=True,
                allow_unused=bool(direct),
            )
    extras: List[Optional[Tensor]] = [None] * len(result.attentions)
    for (i, _), g in zip(direct, grads[len(result.attentions) :]):
        extras[i] = g
    reduced = [
        _reduce_record(g, r, rows, k > 1, query, e)
        for g, r, e in zip(grads, result.attentions, extras)
    ]
    if result.per_layer_batch:
        return reduced[0].view(k, n_layers, batch, -1)  # (k, L·B, N_k) → (k, L, B, N_k)
    return torch.stack(reduced, dim=1)


def layer_maps(
    spec: ViTSpec,
    result: ForwardResult,
    index: TargetIndex,
    grid: Tuple[int, int],
    target_chunk: Optional[int] = None,
) -> Tensor:
    """Per-layer LeGrad maps ``E^l`` for every target: ``(B, K, L, g_h, g_w)``, unnormalised.

    ``target_chunk`` bounds the targets differentiated in one (batched) backward; the
    graph of the forward is reused across chunks, so results do not depend on it.
    """
    with torch.enable_grad():
        selected = _select(result.scores, index)  # (L, B, K)
        n_layers, batch, k = selected.shape
        step = k if target_chunk is None else max(1, int(target_chunk))
        keys = torch.cat(
            [
                _target_keys(selected[..., i : i + step], result, spec.pool_query, i + step < k)
                for i in range(0, k, step)
            ]
        )  # (K, L, B, N_k)
    g_h, g_w = grid
    n_patches = g_h * g_w
    n_prefix = keys.shape[-1] - n_patches
    if n_prefix not in (0, spec.num_prefix_tokens):
        raise CaptureError(
            f"The attention has {keys.shape[-1]} keys but the patch grid is {g_h}x{g_w} "
            f"({n_patches} patches) with {spec.num_prefix_tokens} prefix tokens; check the "
            "ViTSpec's grid rule and num_prefix_tokens."
        )
    maps = keys[..., n_prefix:].reshape(k, n_layers, batch, g_h, g_w)
    return maps.permute(2, 0, 1, 3, 4).detach()


def aggregate_layers(maps: Tensor) -> Tensor:
    """Sum per-layer maps ``(…, L, g_h, g_w)`` over layers (SPEC §1.5)."""
    return maps.sum(dim=-3)


def upsample(maps: Tensor, size: Tuple[int, int], mode: str = "bilinear") -> Tensor:
    """Resize ``(B, K, g_h, g_w)`` maps to ``size`` (``align_corners=False`` for linear modes)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    align: Optional[bool] = False if mode in ("bilinear", "bicubic", "linear") else None
    return F.interpolate(maps, size=size, mode=mode, align_corners=align)


def minmax_normalize(maps: Tensor) -> Tensor:
    """``(E - min) / (max - min)`` over the last two dims; all zeros where ``max == min``.

    No epsilon: maps of random or LayerScale models can be 1e-7 in scale.
    """
    flat = maps.flatten(start_dim=-2)
    low = flat.min(dim=-1, keepdim=True).values
    span = flat.max(dim=-1, keepdim=True).values - low
    safe = torch.where(span > 0, span, torch.ones_like(span))
    out = torch.where(span > 0, (flat - low) / safe, torch.zeros_like(flat))
    return out.view_as(maps)


def empty_prompt_correction(maps: Tensor, empty: Tensor, threshold: float = 0.8) -> Tensor:
    """The reference code's SigLIP "empty prompt" correction, on grid maps.

    ``maps`` (B, K, g_h, g_w) are set to zero where the min-max normalised map of the
    empty prompt, ``empty`` (B, 1, g_h, g_w), exceeds ``threshold``: patches that light up
    for any prompt (attention sinks) are suppressed. Off by default in LeGrad.
    """
    return maps.masked_fill(minmax_normalize(empty) > threshold, 0.0)
