"""Routes: how the attention gradient is obtained, one class per route.

A :class:`Route` says how a block is cut from the graph, which recorder records its
attention, how an attention module's output or a product input becomes a record, and what
else it hooks in a selected block. :mod:`.capture` asks the route and never branches on
its name; :data:`ROUTES` in :mod:`.options` lists the names.

* :class:`ExplicitRoute` (``"explicit"``): the probabilities ``A`` are computed and
  differentiated; the block's graph starts at its cut input.
* :class:`LeanRoute` (``"lean"``, the default): ``∂s/∂A = (∂s/∂O)·Vᵀ`` from the attention
  output ``O``, the block's graph starts there (``docs/method.md``), and every
  ``nn.Linear`` of a selected block computes only its input gradient (:mod:`.linear`).

A new route is one new subclass and its name in :data:`~.options.ROUTES`.
"""

from __future__ import annotations

from typing import Any, List, Optional, Set, Tuple

from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..errors import CaptureError
from . import grad_mode
from .hooks import ScopedHooks
from .linear import linear_input_grad_hooks
from .options import check_route
from .recorders import ExplicitRecorder, LeanRecorder, ValueRecorder
from .records import AttentionRecord, ProbabilityRecord, new_leaf, prune_direct

__all__ = ["Route", "ExplicitRoute", "LeanRoute", "get_route"]


class Route:
    """How one route records attention and cuts blocks (see the module doc)."""

    #: The route's name, as ``LeGrad(route=...)`` takes it.
    name = ""
    #: Whether a selected block's graph starts at its (cut) input.
    graph_from_input = False

    def refuse(self, spec: Any) -> None:
        """Raise a ``ValueError`` if this route cannot explain ``spec``'s model."""

    def cut(self, tokens: Tensor) -> Tensor:
        """A selected block's input, cut from the graph of the blocks before it."""
        raise NotImplementedError

    def recorder(self, sink: List[AttentionRecord]) -> TorchFunctionMode:
        """The mode recording an attention module's calls into ``sink``."""
        raise NotImplementedError

    def later_recorder(self, sink: List[AttentionRecord]) -> TorchFunctionMode:
        """The mode for a block's second and later attention sites
        (:attr:`~captum_legrad.spec.ViTSpec.sites`): their inputs depend on the earlier
        sites' records, so the graph must run through them. The probabilities are computed
        explicitly (:class:`ExplicitRecorder`) and differentiated where they are, so the
        earlier sites' gradients include every path through the later ones."""
        return ExplicitRecorder(sink)

    def output_record(self, output: Tensor) -> Tuple[AttentionRecord, Tensor]:
        """A module whose *output* is the attention (``ViTSpec.output_attentions``): its
        record, and what the rest of the block computes from."""
        raise NotImplementedError

    def hook_product(
        self,
        hooks: ScopedHooks,
        attention: nn.Module,
        product: nn.Module,
        sink: List[AttentionRecord],
    ) -> TorchFunctionMode:
        """``ViTSpec.product_inputs``: record ``attention``'s output ``O = A·V`` at the
        input of ``product``; returns the mode to run while ``attention`` runs."""
        raise ValueError(
            "Attention outputs recorded at a module's input (ViTSpec.product_inputs) need "
            "route='lean'."
        )

    def block_done(self, records: List[AttentionRecord], output: Tensor) -> None:
        """A selected block has run and produced ``output``."""

    def hook_block(
        self,
        hooks: ScopedHooks,
        block: nn.Module,
        mlp_output: Optional[nn.Module],
        token_dim: int,
        hooked: Set[int],
    ) -> None:
        """Further hooks inside a selected block (``hooked``: ids of modules hooked so far
        in this call; ``mlp_output``: the block's last MLP linear when the score reads the
        block's tokens only through their mean)."""


class ExplicitRoute(Route):
    """The probabilities ``A`` computed explicitly and differentiated."""

    name = "explicit"
    graph_from_input = True

    def refuse(self, spec: Any) -> None:
        if spec.product_inputs:
            raise ValueError(
                f"route='explicit' cannot explain blocks {sorted(spec.product_inputs)} of "
                f"this {spec.family} model: their attention matrix (differential attention, "
                "A = softmax1 - lambda * softmax2) is never computed as one tensor, so "
                "there is nothing explicit to differentiate. Use the lean route "
                "(route='lean', the default): it differentiates A exactly through dO·Vᵀ "
                "(docs/method.md)."
            )

    def cut(self, tokens: Tensor) -> Tensor:
        return tokens.detach().requires_grad_()

    def recorder(self, sink: List[AttentionRecord]) -> TorchFunctionMode:
        return ExplicitRecorder(sink)

    def output_record(self, output: Tensor) -> Tuple[AttentionRecord, Tensor]:
        return ProbabilityRecord(output), output


class LeanRoute(Route):
    """``∂s/∂A = (∂s/∂O)·Vᵀ``: the attention matrix is never materialised."""

    name = "lean"

    def cut(self, tokens: Tensor) -> Tensor:
        return tokens.detach()

    def recorder(self, sink: List[AttentionRecord]) -> TorchFunctionMode:
        return LeanRecorder(sink)

    def output_record(self, output: Tensor) -> Tuple[AttentionRecord, Tensor]:
        leaf = new_leaf(output)  # the rest of the block computes from it
        grad_mode.graph_started()
        return ProbabilityRecord(leaf), leaf

    def hook_product(
        self,
        hooks: ScopedHooks,
        attention: nn.Module,
        product: nn.Module,
        sink: List[AttentionRecord],
    ) -> TorchFunctionMode:
        values = ValueRecorder()
        where = type(product).__name__

        def at_input(module: nn.Module, args: Tuple[Any, ...]) -> Any:
            if not args or not isinstance(args[0], Tensor) or values.value is None:
                return None  # not inside the attention's own forward
            output, value = args[0], values.value
            if (
                output.dim() != value.dim()
                or output.shape[:-2] != value.shape[:-2]
                or output.shape[-1] != value.shape[-1]
            ):
                raise CaptureError(
                    f"{where} received {tuple(output.shape)} as its input, and the attention "
                    f"saw a value of shape {tuple(value.shape)}: the input is not the "
                    "attention output O = A·V whose V was recorded."
                )
            record = values.record(output)
            sink.append(record)
            return (record.output, *args[1:])

        hooks.forward_pre(product, at_input)
        return values

    def block_done(self, records: List[AttentionRecord], output: Tensor) -> None:
        prune_direct(records, [output])

    def hook_block(
        self,
        hooks: ScopedHooks,
        block: nn.Module,
        mlp_output: Optional[nn.Module],
        token_dim: int,
        hooked: Set[int],
    ) -> None:
        for linear in block.modules():
            if type(linear) is not nn.Linear or id(linear) in hooked:
                continue  # a linear shared between blocks is hooked once
            hooked.add(id(linear))
            pre_hook, hook = linear_input_grad_hooks(token_dim if linear is mlp_output else None)
            hooks.forward_pre(linear, pre_hook)
            hooks.forward(linear, hook, always_call=True)


_ROUTES = {route.name: route for route in (LeanRoute(), ExplicitRoute())}


def get_route(route: Any) -> Route:
    """The :class:`Route` named ``route`` (a name of :data:`~.options.ROUTES`), or
    ``route`` itself if it is one.

    Raises:
        ValueError: ``route`` names no route.
    """
    if isinstance(route, Route):
        return route
    return _ROUTES[check_route(route)]
