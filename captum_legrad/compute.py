"""The LeGrad computation (``docs/method.md``), written once for every model family.

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

from .capture import capture_blocks, record_attention
from .errors import CaptureError
from .spec import PatchLayout, ViTSpec

__all__ = [
    "ForwardResult",
    "run_forward",
    "layer_maps",
    "aggregate_layers",
    "upsample",
    "minmax_normalize",
    "empty_prompt_correction",
    "POOLINGS",
]

#: Readouts for the per-layer score: the paper's mean over tokens, or the model's own.
POOLINGS = ("mean", "model")

#: ``(B, K)`` index tensors, one per non-batch output dimension, naming the targets.
TargetIndex = Tuple[Tensor, ...]


class ForwardResult:
    """Output of :func:`run_forward`: the per-layer scores and the attentions to differentiate."""

    def __init__(
        self,
        scores: Tensor,
        attentions: List[Tensor],
        per_layer_batch: bool,
        layout: PatchLayout,
        score_rows: Optional[Tensor] = None,
    ) -> None:
        #: Per-layer scores ``(L, B, ...)``; targets index ``scores[l]`` as Captum indexes
        #: a model output.
        self.scores = scores
        #: Differentiated attentions: one ``(B, H, Q, N_k)`` tensor per layer, or a single
        #: ``(L·B, H, Q, N_k)`` tensor for attention-pool readouts.
        self.attentions = attentions
        self.per_layer_batch = per_layer_batch
        #: Where the patches are among the attentions' keys.
        self.layout = layout
        #: ``(B, C)``: the one query row each score column depends on, or None
        #: (:attr:`~captum_legrad.spec.ViTSpec.score_rows`).
        self.score_rows = score_rows

    @property
    def output_shape(self) -> torch.Size:
        """Shape of one layer's scores, ``(B, ...)``: what ``target`` is checked against."""
        return self.scores.shape[1:]


def _single_record(records: List[Tensor], where: str) -> Tensor:
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
) -> ForwardResult:
    """One forward with capture, then the per-layer readout, ready to differentiate."""
    pooled_attention = spec.pool_attention is not None
    with torch.enable_grad():
        with capture_blocks(spec, layers, differentiable=not pooled_attention) as captured:
            # The output itself is not needed: scores come from the readout of each layer
            # (models returning ModelOutput objects are fine).
            forward_func(*inputs, *additional_forward_args)
    readout = spec.read(pooling)
    n_layers, batch = len(layers), inputs[0].shape[0]
    with torch.enable_grad():
        if pooled_attention:
            assert spec.pool_attention is not None
            tokens = torch.cat(captured.tokens).requires_grad_()
            with record_attention([spec.pool_attention]) as records:
                scores = readout(tokens)
            attentions = [_single_record(records[0], type(spec.pool_attention).__name__)]
        else:
            scores = readout(torch.cat(captured.tokens))
            attentions = [
                _single_record(records, f"block {layer} ({type(spec.attentions[layer]).__name__})")
                for layer, records in zip(layers, captured.attentions)
            ]
        scores = scores.reshape(n_layers, batch, *scores.shape[1:])
    layout = spec.patch_layout(inputs, attentions[0].shape[-1])
    rows = None if spec.score_rows is None or pooled_attention else spec.score_rows(inputs)
    return ForwardResult(scores, attentions, pooled_attention, layout, rows)


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


def _target_keys(
    selected: Tensor, result: ForwardResult, query: Optional[int], retain: bool
) -> Tensor:
    """One backward for the ``k`` targets in ``selected`` (L, B, k) → ``(k, L, B, N_k)``."""
    n_layers, batch, k = selected.shape
    rows = n_layers * batch if result.per_layer_batch else batch
    with torch.enable_grad():
        if k == 1:
            grads = torch.autograd.grad(selected.sum(), result.attentions, retain_graph=retain)
            reduced = [_reduce(_split_heads(g, rows, False), query).unsqueeze(0) for g in grads]
        else:
            eye = torch.eye(k, dtype=selected.dtype, device=selected.device)
            grads = torch.autograd.grad(
                selected,
                result.attentions,
                grad_outputs=eye.view(k, 1, 1, k).expand(k, n_layers, batch, k),
                retain_graph=retain,
                is_grads_batched=True,
            )
            reduced = [_reduce(_split_heads(g, rows, True), query) for g in grads]
    if result.per_layer_batch:
        return reduced[0].view(k, n_layers, batch, -1)  # (k, L·B, N_k) → (k, L, B, N_k)
    return torch.stack(reduced, dim=1)


def _distinct_rows(result: ForwardResult, index: TargetIndex) -> Optional[Tensor]:
    """``(B, K)`` query rows of the targets if every sample's targets lie on distinct rows."""
    if result.score_rows is None or len(index) != 1:
        return None
    rows = result.score_rows.to(index[0].device).gather(1, index[0])
    ordered = rows.sort(dim=1).values
    if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
        return None
    return rows


def _row_keys(selected: Tensor, result: ForwardResult, rows: Tensor) -> Tensor:
    """All targets on distinct query ``rows`` (B, K) from one backward → ``(K, L, B, N_k)``.

    Target ``k`` depends on ``A^l`` only through row ``rows[:, k]``, so the gradient of the
    summed targets holds each target's own gradient in its row (zeros elsewhere): the mean
    over heads and query rows of its ReLU is that row's ReLU summed over heads ÷ (H·Q).
    """
    batch = rows.shape[0]
    with torch.enable_grad():
        grads = torch.autograd.grad(selected.sum(), result.attentions)
    reduced = []
    for grad in grads:
        grad = _split_heads(grad, batch, False)  # (B, H, Q, N_k)
        heads, n_q, n_k = grad.shape[-3:]
        where = rows.to(grad.device)[:, None, :, None].expand(-1, heads, -1, n_k)
        picked = grad.gather(-2, where).clamp(min=0).float()  # (B, H, K, N_k)
        reduced.append((picked.sum(dim=1) / (heads * n_q)).transpose(0, 1))  # (K, B, N_k)
    return torch.stack(reduced, dim=1)


def layer_maps(
    spec: ViTSpec,
    result: ForwardResult,
    index: TargetIndex,
    target_chunk: Optional[int] = None,
) -> Tensor:
    """Per-layer LeGrad maps ``E^l`` for every target: ``(B, K, L, g_h, g_w)``, unnormalised.

    ``target_chunk`` bounds the targets differentiated in one (batched) backward; the
    graph of the forward is reused across chunks, so results do not depend on it. The
    patch keys are taken from ``result.layout`` (prefix and padding keys dropped). With
    ``result.score_rows``, targets on distinct query rows share one backward.
    """
    with torch.enable_grad():
        selected = _select(result.scores, index)  # (L, B, K)
    rows = _distinct_rows(result, index) if spec.pool_query is None else None
    if rows is not None:
        keys = _row_keys(selected, result, rows)  # (K, L, B, N_k)
        return result.layout.gather(keys).permute(2, 0, 1, 3, 4).detach()
    with torch.enable_grad():
        k = selected.shape[-1]
        step = k if target_chunk is None else max(1, int(target_chunk))
        keys = torch.cat(
            [
                _target_keys(selected[..., i : i + step], result, spec.pool_query, i + step < k)
                for i in range(0, k, step)
            ]
        )  # (K, L, B, N_k)
    maps = result.layout.gather(keys)  # (K, L, B, g_h, g_w)
    return maps.permute(2, 0, 1, 3, 4).detach()


def aggregate_layers(maps: Tensor) -> Tensor:
    """Sum per-layer maps ``(…, L, g_h, g_w)`` over layers (``docs/method.md``, step 5)."""
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
