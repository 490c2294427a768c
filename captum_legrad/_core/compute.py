"""The LeGrad computation (``docs/method.md``), written once for every model family.

For the selected layers ``S`` and targets ``k``:

* ``s^l_k = readout(Z^l)[target_k]``, the layer's own tokens read out by the head;
* ``G^l_k = ∂s^l_k / ∂A^l``, only block ``l``'s own attention;
* ``E^l_k = mean over heads and query rows of max(G^l_k, 0)``, prefix keys dropped,
  laid out on the patch grid.

All layers come from one forward and one backward per target: every selected block's
input is cut from the graph (:func:`~.capture.capture_blocks`), so ``∂s^l/∂A^m = 0`` for
``m ≠ l``, and one ``autograd.grad`` of the summed scores w.r.t. every layer's attention
record gives every ``G^l`` at once. Several targets reuse the same graph with batched
gradients. What a record is (the probabilities, or on the lean route the attention output
with ``V``) is the record's business (:class:`~.records.AttentionRecord`): nothing here
depends on the route.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..errors import CaptureError
from ..spec import PatchLayout, ViTSpec
from .capture import Captured, capture_blocks, record_attention
from .groups import head_groups
from .records import AttentionRecord, prune_direct
from .routes import Route, get_route
from .targets import TargetIndex

__all__ = ["Part", "ForwardResult", "run_forward", "layer_maps"]


@dataclass(frozen=True)
class Part:
    """One differentiated attention record, where its keys land, and its layer.

    Attributes:
        record: The record.
        layout: Where its patch keys are (:class:`~captum_legrad.spec.PatchLayout`).
        layer: The slot (among the selected layers) whose map it adds to, or ``None`` for
            an attention-pool record, whose batch holds every layer (``L·B`` rows).
        share: Its weight in that layer's map: its share of the layer's heads (head groups,
            :mod:`.groups`), a site's share (:attr:`~captum_legrad.spec.ViTSpec.sites`),
            ``1.0`` for a layer's only attention call.
    """

    record: AttentionRecord
    layout: PatchLayout
    layer: Optional[int] = None
    share: float = 1.0


@dataclass(frozen=True)
class ForwardResult:
    """Output of :func:`run_forward`: the per-layer scores and the attentions to differentiate.

    Attributes:
        scores: Per-layer scores ``(L, B, ...)``; targets index ``scores[l]`` as Captum
            indexes a model output.
        parts: The differentiated attention records, each with its layout (layers may
            differ in their keys: ConViT, CaiT add the class token after the first blocks).
        score_rows: ``(B, C)``: the one query row each score column depends on, or None
            (:attr:`~captum_legrad.spec.ViTSpec.score_rows`).
    """

    scores: Tensor
    parts: Tuple[Part, ...]
    score_rows: Optional[Tensor] = None

    @property
    def layout(self) -> PatchLayout:
        """Where the patches are for this batch (its per-sample grids, if any)."""
        return self.parts[0].layout

    @property
    def output_shape(self) -> torch.Size:
        """Shape of one layer's scores, ``(B, ...)``: what ``target`` is checked against."""
        return self.scores.shape[1:]


def _single_record(records: List[AttentionRecord], where: str) -> AttentionRecord:
    if len(records) != 1:
        what = "no" if not records else f"{len(records)}"
        raise CaptureError(
            f"Expected one attention computation in {where} during the forward, saw {what}. "
            "LeGrad records F.scaled_dot_product_attention, nn.MultiheadAttention and "
            "softmax-over-scores attention; if this module computes attention another way, "
            "describe the model with a ViTSpec whose attention modules compute it one of "
            "these ways."
        )
    return records[0]


# ---------------------------------------------------------------------- readouts


def _pooled_scores(
    spec: ViTSpec,
    captured: Captured,
    route: Route,
    readout: Callable[..., Tensor],
    extra: Tuple[Any, ...],
    arguments: Tuple[Any, ...],
) -> Tuple[Tensor, Tuple[Part, ...]]:
    """An attention-pool readout (SigLIP's MAP, CoCa): every layer's tokens through the
    pooler at once, whose attention (batch ``L·B``) is the one differentiated record."""
    assert spec.pool_attention is not None
    tokens = route.cut(torch.cat(captured.tokens))
    captured.tokens.clear()
    with record_attention([spec.pool_attention], route) as records:
        scores = readout(tokens, *extra)
    prune_direct(records[0], [scores])
    record = _single_record(records[0], type(spec.pool_attention).__name__)
    return scores, (Part(record, spec.patch_layout(arguments, record.num_keys)),)


def _token_mean_scores(captured: Captured, readout: Callable[..., Tensor]) -> Tensor:
    """A readout that reads each layer only through its mean over tokens: the mean over one
    token is that token, so one batched readout of the means gives every layer's scores
    (one pass through the head, whatever the layer count)."""
    means = [tokens.mean(dim=1, keepdim=True) for tokens in captured.tokens]
    captured.tokens.clear()
    return readout(torch.cat(means))


def _layer_scores(
    captured: Captured, readout: Callable[..., Tensor], extra: Tuple[Any, ...]
) -> Tensor:
    """One readout per layer: no stacked copy of every layer's tokens, and layers may differ
    in their tokens (ConViT, CaiT)."""
    scores = torch.cat([readout(tokens, *extra) for tokens in captured.tokens])
    captured.tokens.clear()
    return scores


def _layer_parts(
    spec: ViTSpec,
    layers: Sequence[int],
    captured: Captured,
    batch: int,
    arguments: Tuple[Any, ...],
) -> Tuple[Part, ...]:
    """Each selected layer's records with their layouts: one, the head groups of parallel
    attentions, or one per site."""
    layouts: Dict[int, PatchLayout] = {}

    def layout(record: AttentionRecord) -> PatchLayout:
        n_keys = record.num_keys
        if n_keys not in layouts:
            layouts[n_keys] = spec.patch_layout(arguments, n_keys)
        return layouts[n_keys]

    parts: List[Part] = []
    for slot, (layer, calls) in enumerate(zip(layers, captured.attentions)):
        sites = spec.sites.get(layer)
        if sites:
            for site, site_calls in zip(sites, captured.sites[slot]):
                where = f"block {layer} ({type(site.module).__name__})"
                record = _single_record(site_calls, where)
                site_layout = site.layout(arguments, record.num_keys)
                parts.append(Part(record, site_layout, slot, site.share))
            continue
        where = f"block {layer} ({type(spec.attentions[layer]).__name__})"
        if layer in spec.parallel_attentions:
            groups, shares = head_groups(calls, batch, where)
            parts += [Part(r, layout(r), slot, share) for r, share in zip(groups, shares)]
        else:
            record = _single_record(calls, where)
            parts.append(Part(record, layout(record), slot))
    return tuple(parts)


def run_forward(
    spec: ViTSpec,
    forward_func: Callable[..., Any],
    inputs: Tuple[Tensor, ...],
    additional_forward_args: Tuple[Any, ...],
    layers: Sequence[int],
    pooling: str,
    route: Union[str, Route] = "lean",
) -> ForwardResult:
    """One forward with capture, then the per-layer readout, ready to differentiate.

    ``route`` (:data:`~.options.ROUTES`): ``"lean"`` records attention outputs and values
    (the probabilities are never materialised), ``"explicit"`` the probabilities.
    ``pooling`` is ``"mean"`` or ``"model"`` (checked by the caller, ``LeGrad``).
    """
    chosen = get_route(route)
    pooled = spec.pool_attention is not None
    token_mean = pooling == "mean" and spec.token_mean_readout
    with torch.enable_grad():
        read_rows = None if spec.read_rows is None else partial(spec.read_rows, inputs)
        with capture_blocks(
            spec,
            layers,
            differentiable=not pooled,
            route=chosen,
            token_mean_readout=token_mean,
            read_rows=read_rows,
        ) as captured:
            # The output itself is not needed: scores come from the readout of each layer
            # (models returning ModelOutput objects are fine).
            forward_func(*inputs, *additional_forward_args)
    readout = spec.read(pooling)
    arguments = (*inputs, *additional_forward_args)
    n_layers, batch = len(layers), spec.batch_size(arguments)
    with torch.enable_grad():
        if pooled:
            extra = spec.extra_readout_inputs(arguments, n_layers * batch)
            scores, parts = _pooled_scores(spec, captured, chosen, readout, extra, arguments)
        else:
            if token_mean:
                scores = _token_mean_scores(captured, readout)
            else:
                scores = _layer_scores(
                    captured, readout, spec.extra_readout_inputs(arguments, batch)
                )
            parts = _layer_parts(spec, layers, captured, batch, arguments)
        scores = scores.reshape(n_layers, batch, *scores.shape[1:])
    rows = None if spec.score_rows is None or pooled else spec.score_rows(inputs)
    return ForwardResult(scores, parts, rows)


# ---------------------------------------------------------------------- the backward


def _select(scores: Tensor, index: TargetIndex) -> Tensor:
    """``scores`` (L, B, ...) at ``index`` ((B, K) each) → (L, B, K)."""
    batch, k = index[0].shape
    rows = torch.arange(batch, device=scores.device).unsqueeze(1).expand(batch, k)
    where: Tuple[Any, ...] = (slice(None), rows, *index)
    return scores[where]


def _per_layer(reduced: List[Tensor], result: ForwardResult) -> List[Tensor]:
    """Each part's ``(k, rows, N_k)`` → per layer ``(k, B, *grid)``: laid out by the part's
    layout, an attention-pool record split into its layers, several parts of one layer
    (head groups, sites) summed with their shares."""
    n_layers = result.scores.shape[0]
    # Layers that a dispatched model (accelerate's device_map) runs on other devices: their
    # maps join the scores' device.
    reduced = [values.to(result.scores.device) for values in reduced]
    first = result.parts[0]
    if first.layer is None:  # an attention pool: (k, L·B, N_k)
        k = reduced[0].shape[0]
        per_layer = reduced[0].view(k, n_layers, -1, reduced[0].shape[-1]).unbind(1)
        return [first.layout.gather(values) for values in per_layer]
    layers: List[Optional[Tensor]] = [None] * n_layers
    for part, values in zip(result.parts, reduced):
        assert part.layer is not None
        cells = part.layout.gather(values)
        weighted = cells if part.share == 1.0 else cells * part.share
        current = layers[part.layer]
        layers[part.layer] = weighted if current is None else current + weighted
    out = [layer for layer in layers if layer is not None]
    assert len(out) == n_layers
    return out


def _target_keys(
    selected: Tensor, result: ForwardResult, query: Optional[int], retain: bool
) -> List[Tensor]:
    """One backward for the ``k`` targets in ``selected`` (L, B, k) → per layer ``(k, B, N_k)``."""
    n_layers, batch, k = selected.shape
    pooled = result.parts[0].layer is None
    records = [part.record for part in result.parts]
    # Eager attention whose probabilities something else used too: their direct gradient.
    direct = [(i, r.direct) for i, r in enumerate(records) if r.direct is not None]
    leaves = [r.leaf for r in records] + [d for _, d in direct]
    with torch.enable_grad():
        if k == 1:
            grads = torch.autograd.grad(
                selected.sum(), leaves, retain_graph=retain, allow_unused=bool(direct)
            )
        else:
            eye = torch.eye(k, dtype=selected.dtype, device=selected.device)
            grads = torch.autograd.grad(
                selected,
                leaves,
                grad_outputs=eye.view(k, 1, 1, k).expand(k, n_layers, batch, k),
                retain_graph=retain,
                is_grads_batched=True,
                allow_unused=bool(direct),
            )
    extras: List[Optional[Tensor]] = [None] * len(records)
    for (i, _), g in zip(direct, grads[len(records) :]):
        extras[i] = g
    reduced = [
        part.record.reduce(
            g,
            rows=(n_layers if pooled else 1) * batch * part.layout.rows,
            batched=k > 1,
            query=query,
            direct=e,
        )
        for part, g, e in zip(result.parts, grads, extras)
    ]
    return _per_layer(reduced, result)


def _distinct_rows(result: ForwardResult, index: TargetIndex) -> Optional[Tensor]:
    """``(B, K)`` query rows of the targets if every sample's targets lie on distinct rows."""
    if result.score_rows is None or len(index) != 1:
        return None
    if len({part.layer for part in result.parts}) != len(result.parts):
        return None  # head groups, sites: the general path
    if any(part.layout.rows != 1 for part in result.parts):
        return None
    if any(part.record.direct is not None for part in result.parts):
        return None  # eager probabilities used besides their product with V: general path
    rows = result.score_rows.to(index[0].device).gather(1, index[0])
    ordered = rows.sort(dim=1).values
    if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
        return None
    return rows


def _row_keys(selected: Tensor, result: ForwardResult, rows: Tensor) -> List[Tensor]:
    """All targets on distinct query ``rows`` (B, K) from one backward → per layer
    ``(K, B, *grid)``.

    Target ``k`` depends on ``A^l`` only through row ``rows[:, k]``, so the gradient of the
    summed targets holds each target's own gradient in its row (zeros elsewhere)
    (:meth:`~.records.AttentionRecord.reduce_rows`).
    """
    records = [part.record for part in result.parts]
    with torch.enable_grad():
        grads = torch.autograd.grad(selected.sum(), [r.leaf for r in records])
    return _per_layer([r.reduce_rows(g, rows) for r, g in zip(records, grads)], result)


def layer_maps(
    spec: ViTSpec,
    result: ForwardResult,
    index: TargetIndex,
    target_chunk: Optional[int] = None,
) -> Tensor:
    """Per-layer LeGrad maps ``E^l`` for every target: ``(B, K, L, *grid)``, unnormalised.

    ``target_chunk`` bounds the targets differentiated in one (batched) backward; the
    graph of the forward is reused across chunks, so results do not depend on it. The
    patch keys are taken from each part's layout (prefix and padding keys dropped). With
    ``result.score_rows``, targets on distinct query rows share one backward.
    """
    with torch.enable_grad():
        selected = _select(result.scores, index)  # (L, B, K)
    rows = _distinct_rows(result, index) if spec.pool_query is None else None
    if rows is not None:
        per_layer = _row_keys(selected, result, rows)  # per layer (K, B, *grid)
    else:
        k = selected.shape[-1]
        step = k if target_chunk is None else max(1, int(target_chunk))
        with torch.enable_grad():  # the chunks are views on the graph
            chunks = [
                _target_keys(selected[..., i : i + step], result, spec.pool_query, i + step < k)
                for i in range(0, k, step)
            ]  # per chunk, per layer (k, B, *grid)
        per_layer = [torch.cat(layer) for layer in zip(*chunks)]
    maps = torch.stack(per_layer, dim=1)  # (K, L, B, *grid)
    return maps.movedim(2, 0).detach()
