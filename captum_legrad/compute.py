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

from .capture import ROUTES, capture_blocks, record_attention
from .errors import CaptureError
from .groups import head_groups, merge_head_groups
from .lean import LeanRecord, Record, prune_probabilities, record_keys, reduce_lean
from .spec import PatchLayout, ViTSpec

__all__ = [
    "ForwardResult",
    "run_forward",
    "layer_maps",
    "aggregate_layers",
    "upsample",
    "upsample_each",
    "grid_mask",
    "patch_rows",
    "minmax_normalize",
    "empty_prompt_correction",
    "POOLINGS",
    "ROUTES",
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
        attentions: List[Record],
        per_layer_batch: bool,
        layout: PatchLayout,
        layouts: Optional[List[PatchLayout]] = None,
        score_rows: Optional[Tensor] = None,
        owners: Optional[List[int]] = None,
        weights: Optional[List[float]] = None,
    ) -> None:
        #: Per-layer scores ``(L, B, ...)``; targets index ``scores[l]`` as Captum indexes
        #: a model output.
        self.scores = scores
        #: Differentiated attentions, one record per layer, or a single one for
        #: attention-pool readouts (whose batch is ``L·B``): the probabilities ``(B, H, Q,
        #: N_k)`` (explicit route), or a :class:`~captum_legrad.lean.LeanRecord`.
        self.attentions = attentions
        self.per_layer_batch = per_layer_batch
        #: Where the patches are among the attentions' keys.
        self.layout = layout
        #: Per layer, where its attention's patch keys are: layers may differ in
        #: their keys (ConViT, CaiT: the class token joins after the first blocks).
        self.layouts = layouts if layouts is not None else [layout] * scores.shape[0]
        #: ``(B, C)``: the one query row each score column depends on, or None
        #: (:attr:`~captum_legrad.spec.ViTSpec.score_rows`).
        self.score_rows = score_rows
        #: With head groups (:attr:`~captum_legrad.spec.ViTSpec.parallel_attentions`): the
        #: layer of each record in ``attentions`` and its share of that layer's heads
        #: (:mod:`captum_legrad.groups`); ``None``: one record per layer.
        self.owners = owners
        self.weights = weights

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
            token_mean_readout=pooling == "mean" and spec.token_mean_readout,
        ) as captured:
            # The output itself is not needed: scores come from the readout of each layer
            # (models returning ModelOutput objects are fine).
            forward_func(*inputs, *additional_forward_args)
    readout = spec.read(pooling)
    n_layers, batch = len(layers), inputs[0].shape[0]
    arguments = (*inputs, *additional_forward_args)
    extra = spec.extra_readout_inputs(arguments, n_layers * batch)  # e.g. padding masks
    owners: List[int] = []
    weights: List[float] = []
    with torch.enable_grad():
        if pooled_attention:
            assert spec.pool_attention is not None
            tokens = torch.cat(captured.tokens)
            if route == "explicit":
                tokens.requires_grad_()
            with record_attention([spec.pool_attention], route) as records:
                scores = readout(tokens, *extra)
            prune_probabilities(records[0], [scores])
            attentions = [_single_record(records[0], type(spec.pool_attention).__name__)]
        else:
            per_layer = captured.tokens
            if pooling == "mean" and spec.token_mean_readout:
                # The readout reads each layer only through its mean over tokens, and the
                # mean over one token is that token: one batched readout of the means (one
                # pass through the head, whatever the layer count), the same scores.
                means = [tokens.mean(dim=1, keepdim=True) for tokens in per_layer]
                captured.tokens.clear()
                scores = readout(torch.cat(means))
            elif route == "lean" or any(t.shape[1:] != per_layer[0].shape[1:] for t in per_layer):
                # One readout per layer: no stacked copy of every layer's tokens (memory), and
                # layers may differ in their tokens (ConViT, CaiT: the class token joins late).
                one = spec.extra_readout_inputs(arguments, batch)
                scores = torch.cat([readout(tokens, *one) for tokens in per_layer])
                captured.tokens.clear()
            else:
                scores = readout(torch.cat(per_layer), *extra)
            attentions = []
            for slot, (layer, calls) in enumerate(zip(layers, captured.attentions)):
                where = f"block {layer} ({type(spec.attentions[layer]).__name__})"
                if layer in spec.parallel_attentions:  # head groups of one attention
                    groups, shares = head_groups(calls, batch, where)
                    owners += [slot] * len(groups)
                    weights += shares
                    attentions += groups
                else:
                    owners.append(slot)
                    weights.append(1.0)
                    attentions.append(_single_record(calls, where))
        scores = scores.reshape(n_layers, batch, *scores.shape[1:])
    keys = [record_keys(a) for a in attentions]
    by_keys = {n: spec.patch_layout(arguments, n) for n in set(keys)}
    layouts = [by_keys[n] for n in keys] * (n_layers if pooled_attention else 1)
    rows = None if spec.score_rows is None or pooled_attention else spec.score_rows(inputs)
    return ForwardResult(
        scores,
        attentions,
        per_layer_batch=pooled_attention,
        layout=layouts[0],
        layouts=layouts,
        score_rows=rows,
        owners=owners if len(owners) > n_layers else None,
        weights=weights if len(owners) > n_layers else None,
    )


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
) -> List[Tensor]:
    """One backward for the ``k`` targets in ``selected`` (L, B, k) → per layer ``(k, B, N_k)``."""
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
        return list(reduced[0].view(k, n_layers, batch, -1).unbind(1))  # (k, L·B, N_k)
    return reduced


def _distinct_rows(result: ForwardResult, index: TargetIndex) -> Optional[Tensor]:
    """``(B, K)`` query rows of the targets if every sample's targets lie on distinct rows."""
    if result.score_rows is None or len(index) != 1 or result.owners is not None:
        return None
    if any(isinstance(r, LeanRecord) and r.probabilities is not None for r in result.attentions):
        return None  # eager probabilities used besides their product with V: general path
    rows = result.score_rows.to(index[0].device).gather(1, index[0])
    ordered = rows.sort(dim=1).values
    if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
        return None
    return rows


def _row_keys(selected: Tensor, result: ForwardResult, rows: Tensor) -> Tensor:
    """All targets on distinct query ``rows`` (B, K) from one backward → ``(K, L, B, N_k)``.

    Target ``k`` depends on ``A^l`` only through row ``rows[:, k]``, so the gradient of the
    summed targets holds each target's own gradient in its row (zeros elsewhere): the mean
    over heads and query rows of its ReLU is that row's ReLU summed over heads ÷ (H·Q). On
    the lean route the row of ``∂s/∂A`` is the row of ``∂s/∂O`` times ``Vᵀ``.
    """
    batch = rows.shape[0]
    inputs = [r.output if isinstance(r, LeanRecord) else r for r in result.attentions]
    with torch.enable_grad():
        grads = torch.autograd.grad(selected.sum(), inputs)
    reduced = []
    for grad, record in zip(grads, result.attentions):
        grad = _split_heads(grad, batch, False)  # (B, H, Q, N_k) or, lean, (B, H, Q, d)
        heads, n_q, width = grad.shape[-3:]
        where = rows.to(grad.device)[:, None, :, None].expand(-1, heads, -1, width)
        picked = grad.gather(-2, where)  # (B, H, K, ·)
        if isinstance(record, LeanRecord):
            # (K, B, H, 1, d) rows of dO → (K, B, N_k), mean over one query row → over all Q
            per_row = picked.permute(2, 0, 1, 3).unsqueeze(-2)
            reduced.append(reduce_lean(per_row, record.value) / n_q)
        else:
            total = picked.clamp(min=0).float().sum(dim=1) / (heads * n_q)  # (B, K, N_k)
            reduced.append(total.transpose(0, 1))  # (K, B, N_k)
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
        chunks = [
            _target_keys(selected[..., i : i + step], result, spec.pool_query, i + step < k)
            for i in range(0, k, step)
        ]  # per chunk, per layer (k, B, N_k)
    per_layer = [
        layout.gather(torch.cat([chunk[layer] for chunk in chunks]))  # (K, B, g_h, g_w)
        for layer, layout in enumerate(result.layouts)
    ]
    maps = torch.stack(per_layer, dim=1)  # (K, L, B, g_h, g_w)
    if result.owners is not None and result.weights is not None:  # head groups → layers
        maps = merge_head_groups(maps, result.owners, result.weights, result.scores.shape[0])
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


def minmax_normalize(maps: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """``(E - min) / (max - min)`` over the last two dims; all zeros where ``max == min``.

    No epsilon: maps of random or LayerScale models can be 1e-7 in scale. ``valid``
    (broadcastable to ``maps``, boolean): only these pixels count for min and max, the
    others are zero in the result (per-sample sizes padded to the batch's largest).
    """
    flat = maps.flatten(start_dim=-2)
    if valid is None:
        low = flat.min(dim=-1, keepdim=True).values
        high = flat.max(dim=-1, keepdim=True).values
    else:
        keep = valid.expand_as(maps).flatten(start_dim=-2)
        low = flat.masked_fill(~keep, float("inf")).min(dim=-1, keepdim=True).values
        high = flat.masked_fill(~keep, float("-inf")).max(dim=-1, keepdim=True).values
        low = torch.where(keep.any(dim=-1, keepdim=True), low, torch.zeros_like(low))
        high = torch.where(keep.any(dim=-1, keepdim=True), high, torch.zeros_like(high))
    span = high - low
    safe = torch.where(span > 0, span, torch.ones_like(span))
    out = torch.where(span > 0, (flat - low) / safe, torch.zeros_like(flat))
    if valid is not None:
        out = out.masked_fill(~keep, 0.0)
    return out.view_as(maps)


def upsample_each(
    maps: Tensor, grids: Tensor, patch_size: Tuple[int, int], mode: str = "bilinear"
) -> Tuple[Tensor, Tensor]:
    """Per-sample grids → per-sample image sizes, padded to the batch's largest.

    ``maps`` (B, K, g_h, g_w) hold sample ``b``'s map in the top-left ``grids[b]`` corner;
    each is upsampled to its own size ``grids[b] · patch_size`` and placed top-left in
    ``(B, K, H_max, W_max)`` zeros. Returns the maps and the boolean ``(B, 1, H_max, W_max)``
    mask of each sample's own pixels.
    """
    sizes = grids.cpu().long() * torch.tensor(patch_size, dtype=torch.long)
    height, width = int(sizes[:, 0].max()), int(sizes[:, 1].max())
    out = maps.new_zeros((maps.shape[0], maps.shape[1], height, width))
    valid = torch.zeros((maps.shape[0], 1, height, width), dtype=torch.bool, device=maps.device)
    for b, ((g_h, g_w), (h, w)) in enumerate(zip(grids.tolist(), sizes.tolist())):
        own = maps[b : b + 1, :, :g_h, :g_w]
        out[b, :, :h, :w] = upsample(own, (h, w), mode)[0]
        valid[b, :, :h, :w] = True
    return out, valid


def patch_rows(
    maps: Tensor, layout: PatchLayout, patches: Tensor, patch_size: Tuple[int, int]
) -> Tensor:
    """Image-space maps ``(B, K, H, W)`` → the patch sequence's form ``(B, K, N, D)``.

    Row ``r`` of sample ``b`` (key ``layout.row_offset + r``) gets the pixels of its patch
    in ``(p_h, p_w, C)`` order, the map repeated over the ``C`` channels; padding rows are
    zero.
    """
    p_h, p_w = patch_size
    batch, n_rows, width = patches.shape
    if width % (p_h * p_w):
        raise ValueError(
            f"A patch row has {width} values, not a multiple of the patch size {p_h}x{p_w}: "
            'use output="map" for this input.'
        )
    channels = width // (p_h * p_w)
    out = maps.new_zeros((batch, maps.shape[1], n_rows, width))
    g_max = layout.grid
    keys = layout.keys.view(-1, *g_max) if layout.keys.dim() == 2 else None
    for b, (g_h, g_w) in enumerate(layout.sample_grids(batch).tolist()):
        own = maps[b, :, : g_h * p_h, : g_w * p_w]
        own = own.unflatten(-1, (g_w, p_w)).unflatten(-3, (g_h, p_h))
        pixels = own.permute(0, 1, 3, 2, 4).reshape(maps.shape[1], g_h * g_w, p_h * p_w, 1)
        pixels = pixels.expand(-1, -1, -1, channels).flatten(-2)  # (K, n, p_h·p_w·C)
        cells = (keys[b, :g_h, :g_w] if keys is not None else layout.keys.view(g_max)).flatten()
        cells = cells.to(maps.device)
        present = cells >= 0
        rows = cells[present] - layout.row_offset
        out[b, :, rows] = pixels[:, present]
    return out


def grid_mask(grids: Tensor, grid: Tuple[int, int], device: torch.device) -> Tensor:
    """Boolean ``(B, 1, g_h, g_w)``: the cells of each sample's own grid ``grids[b]``."""
    rows = torch.arange(grid[0], device=device).view(1, -1, 1)
    cols = torch.arange(grid[1], device=device).view(1, 1, -1)
    g = grids.to(device)
    return ((rows < g[:, 0].view(-1, 1, 1)) & (cols < g[:, 1].view(-1, 1, 1))).unsqueeze(1)


def empty_prompt_correction(
    maps: Tensor, empty: Tensor, threshold: float = 0.8, valid: Optional[Tensor] = None
) -> Tensor:
    """The reference code's SigLIP "empty prompt" correction, on grid maps.

    ``maps`` (B, K, g_h, g_w) are set to zero where the min-max normalised map of the
    empty prompt, ``empty`` (B, 1, g_h, g_w), exceeds ``threshold``: patches that light up
    for any prompt (attention sinks) are suppressed. Off by default in LeGrad.
    """
    return maps.masked_fill(minmax_normalize(empty, valid) > threshold, 0.0)
