"""Scoped capture of the attention records and residual streams of one forward.

:func:`record_attention` records what given attention modules compute while they run, by
the route's recorder (:mod:`.routes`, :mod:`.recorders`); :func:`capture_blocks` hooks a
ViT's blocks for one forward, cuts each selected block from the graph, keeps its output
``Z^l`` and records its attention.

Everything is scoped to the call: forward hooks push and pop the recorders around the
modules' own forwards, act only in the calling thread (:class:`~.hooks.ScopedHooks`) and are
all removed when the call ends, also when it raises. Grad mode is switched at the points
:mod:`.grad_mode` lists. No flag, attribute, forward method or parameter of the model is
changed, nothing is patched process-wide.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..errors import CaptureError
from ..spec import ViTSpec
from . import grad_mode
from .hooks import ScopedHooks, mode_stack_guard
from .records import AttentionRecord
from .routes import Route, get_route
from .saved import ReadRows

__all__ = ["record_attention", "capture_blocks", "Captured"]


def _enter(recorder: TorchFunctionMode) -> Callable[..., None]:
    def hook(module: nn.Module, args: Any) -> None:
        recorder.__enter__()

    return hook


def _leave(recorder: TorchFunctionMode) -> Callable[..., None]:
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        recorder.__exit__(None, None, None)

    return hook


def _keep_output(route: Route, sink: List[AttentionRecord]) -> Callable[..., Any]:
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if not isinstance(output, Tensor):
            return None
        record, replacement = route.output_record(output)
        sink.append(record)
        return replacement

    return hook


@contextmanager
def record_attention(
    modules: Sequence[nn.Module],
    route: Union[str, Route] = "lean",
    outputs: Sequence[bool] = (),
    products: Sequence[Optional[nn.Module]] = (),
    later: Sequence[bool] = (),
) -> Iterator[List[List[AttentionRecord]]]:
    """Record the attention each of ``modules`` computes in its forward.

    Yields one list of :class:`~.records.AttentionRecord` s per module, filled in call order
    while the context is open: on the explicit route the probabilities, on the lean route
    (the default) the attention outputs with their values (:mod:`.routes`).

    Args:
        modules: The attention modules.
        route: ``"lean"`` or ``"explicit"`` (or a :class:`~.routes.Route`).
        outputs: ``outputs[i]`` true: module ``i``'s output *is* the attention
            (``ViTSpec.output_attentions``) and is recorded as it is.
        products: ``products[i]`` a module: module ``i``'s attention output ``O = A·V`` is
            the first input of that module (``ViTSpec.product_inputs``; lean route only).
        later: ``later[i]`` true: module ``i`` is a later attention site of its block
            (:meth:`~.routes.Route.later_recorder`).
    """
    chosen = get_route(route)
    records: List[List[AttentionRecord]] = [[] for _ in modules]
    as_output = list(outputs) + [False] * (len(modules) - len(outputs))
    at_input = list(products) + [None] * (len(modules) - len(products))
    is_later = list(later) + [False] * (len(modules) - len(later))
    with mode_stack_guard(), ScopedHooks() as hooks:
        for module, sink, output, product, late in zip(
            modules, records, as_output, at_input, is_later
        ):
            if output:
                hooks.forward(module, _keep_output(chosen, sink))
                continue
            if product is not None:
                recorder = chosen.hook_product(hooks, module, product, sink)
            elif late:
                recorder = chosen.later_recorder(sink)
            else:
                recorder = chosen.recorder(sink)
            hooks.forward_pre(module, _enter(recorder))
            hooks.forward(module, _leave(recorder), always_call=True)
        yield records


@dataclass
class Captured:
    """What one forward through the model left behind for LeGrad.

    ``tokens[i]`` is ``Z`` of the i-th selected block (batch-first); with
    ``differentiable=True`` it is on the autograd graph back to that block's own
    attention records ``attentions[i]`` (and to nothing earlier: block inputs are cut).
    A block with :attr:`~captum_legrad.spec.ViTSpec.sites` has its records in
    ``sites[i]`` instead, one list per site.
    """

    tokens: List[Tensor] = field(default_factory=list)
    attentions: List[List[AttentionRecord]] = field(default_factory=list)
    sites: Dict[int, List[List[AttentionRecord]]] = field(default_factory=dict)


@contextmanager
def capture_blocks(
    spec: ViTSpec,
    layers: Sequence[int],
    *,
    differentiable: bool,
    route: Union[str, Route] = "lean",
    token_mean_readout: bool = False,
    read_rows: Optional[Callable[[], Tensor]] = None,
) -> Iterator[Captured]:
    """Hook ``spec``'s blocks for one forward and collect ``Z^l`` (and the records of
    ``A^l``).

    Each selected block's input is cut from the graph (:meth:`~.routes.Route.cut`), so
    ``∂Z^l/∂A^m = 0`` for ``m ≠ l`` and earlier blocks build no graph at all; block outputs
    are never changed, so the model computes what it always computes. With
    ``differentiable=False`` (an attention-pool readout differentiates the pool's
    attention instead) the blocks' outputs are only collected, without any graph.
    ``token_mean_readout``: the scores read each ``Z^l`` only through its mean over tokens
    (the lean route then takes one row per sample through the blocks'
    :attr:`~captum_legrad.spec.ViTSpec.mlp_outputs`). ``read_rows``: returns the rows
    ``(B, R)`` at which the scores read each ``Z^l``
    (:attr:`~captum_legrad.spec.ViTSpec.read_rows`); where a block's graph starts at its
    attention output (the lean route), the tensors it saves are kept at these rows only
    (:mod:`.saved`).
    """
    chosen = get_route(route)
    selected = {layer: slot for slot, layer in enumerate(layers)}
    captured = Captured(tokens=[torch.empty(0)] * len(layers))
    seen = [False] * len(layers)
    token_dim = 1 if spec.batch_first else 0
    rows_only = (
        ReadRows(read_rows)
        if read_rows is not None
        and differentiable
        and spec.batch_first
        and not chosen.graph_from_input
        else None
    )

    def root_pre_hook(module: nn.Module, args: Any) -> None:
        grad_mode.model_entered()

    def block_pre_hook(layer: int) -> Callable[..., Any]:
        differentiate = differentiable and layer in selected

        def hook(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
            grad_mode.block_entered(differentiate and chosen.graph_from_input)
            if not differentiate:
                return None
            tokens = spec.tokens
            inputs = tokens.get(args, kwargs)
            if rows_only is not None:
                rows_only.tokens = (int(inputs.shape[0]), int(inputs.shape[1]))
            return tokens.replace(args, kwargs, chosen.cut(inputs))

        return hook

    def block_hook(layer: int) -> Callable[..., None]:
        slot = selected[layer]

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            tokens = output[0] if isinstance(output, (tuple, list)) else output
            if not spec.batch_first:
                tokens = tokens.transpose(0, 1)
            captured.tokens[slot] = tokens if differentiable else tokens.detach()
            seen[slot] = True
            if differentiable:
                records = list(captured.attentions[slot])
                for site in captured.sites.get(slot, []):
                    records += site
                chosen.block_done(records, tokens)

        return hook

    def block_post_hook(module: nn.Module, args: Any, output: Any) -> None:
        grad_mode.block_left()
        if rows_only is not None:
            rows_only.tokens = None

    modules: List[nn.Module] = []
    outputs: List[bool] = []
    products: List[Optional[nn.Module]] = []
    owners: List[Tuple[int, Optional[int]]] = []  # (slot, site) of each recorded module
    if differentiable:
        chosen.refuse(spec)
        for slot, layer in enumerate(layers):
            sites = spec.sites.get(layer, ())
            for index, site in enumerate(sites):
                modules.append(site.module)
                outputs.append(False)
                products.append(None)
                owners.append((slot, index))
            if not sites:
                modules.append(spec.attentions[layer])
                outputs.append(layer in spec.output_attentions)
                products.append(spec.product_inputs.get(layer))
                owners.append((slot, None))
    later = [site is not None and site > 0 for _, site in owners]
    with (
        record_attention(modules, chosen, outputs, products, later) as records,
        ScopedHooks() as hooks,
        nullcontext() if rows_only is None else rows_only.hooks(),
    ):
        hooks.forward_pre(spec.root, root_pre_hook)
        hooked: Set[int] = set()
        for index, block in enumerate(spec.blocks):
            hooks.forward_pre(block, block_pre_hook(index), with_kwargs=True)
            if index in selected:
                hooks.forward(block, block_hook(index))
                if differentiable:
                    mlp = spec.mlp_output(index) if token_mean_readout else None
                    chosen.hook_block(hooks, block, mlp, token_dim, hooked)
            hooks.forward(block, block_post_hook)
        captured.attentions = [[] for _ in layers]
        for (slot, site_index), sink in zip(owners, records):
            if site_index is None:
                captured.attentions[slot] = sink
            else:
                captured.sites.setdefault(slot, []).append(sink)
        yield captured
    missing = [layers[slot] for slot, ok in enumerate(seen) if not ok]
    if missing:
        raise CaptureError(
            f"Blocks {missing} of the {spec.family} model did not run during the forward; "
            "check that forward_func calls the model these blocks belong to."
        )
