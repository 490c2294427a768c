"""The lean route's linears: every ``nn.Linear`` of a selected block computes only its input
gradient, and the block's last MLP linear one row per sample under a token-mean readout.

LeGrad's backward asks only for the gradients at the attention records, never for a weight
gradient, so a linear's input need not be kept for one: :func:`linear_input_grad_hooks` runs
the linear without a graph and puts its output back on its input's graph through
:class:`LinearInputGrad`, whose backward is ``dX = dY · W``. The forward keeps less memory
(fewer fresh pages to fault in on every call) and computes the same output.

With ``pooling="mean"`` the score reads ``Z^l`` only through its mean over tokens, so
``∂s/∂Z^l_n`` is the same for every token ``n``; where a block's output is ``x + t(W h +
b)`` (``t`` acting alike on every token: dropout in eval, LayerScale, drop path, the
residual add), the gradient at that linear's output is the same for every token too, and
its input gradient ``Wᵀ g`` is one row broadcast to every token. Which linear that is, is
model knowledge: the adapters name it in :attr:`~captum_legrad.spec.ViTSpec.mlp_outputs`.

A linear that accelerate dispatches (``device_map``, CPU or disk offload) runs as it is
(:func:`dispatched`): its weights exist only during its own forward.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

from torch import Tensor, autograd, nn

from .grad_mode import LinearModes

__all__ = ["LinearInputGrad", "linear_input_grad_hooks", "dispatched"]


def _alias(output: Tensor) -> Tensor:
    """``output`` as a tensor that is not a view (same storage, no copy), so that a model
    may modify the linear's output in place (Llama 4's MoE adds into it): autograd forbids
    in-place changes of a view a custom Function returns. The output is passed in a list
    (not as an input of the Function) and the original is dropped by the hook."""
    if output._base is None:
        return output
    alias = output.new_empty(0)
    return alias.set_(
        output.untyped_storage(), output.storage_offset(), output.size(), output.stride()
    )


class LinearInputGrad(autograd.Function):
    """A linear's output ``y = W x + b``, computed without a graph, put on the graph of its
    input only: the backward gives ``dX = dY · W`` (no weight or bias gradient, and ``x`` is
    not kept for one), or with ``token_dim`` the shared row ``mean_n(dY_n) · W`` broadcast
    to every token (see :func:`linear_input_grad_hooks`)."""

    @staticmethod
    def forward(
        ctx: Any, inputs: Tensor, holder: List[Tensor], weight: Tensor, token_dim: Optional[int]
    ) -> Tensor:
        ctx.save_for_backward(weight)
        ctx.token_dim, ctx.input_shape = token_dim, inputs.shape
        return _alias(holder[0])

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


def dispatched(module: nn.Module) -> bool:
    """Whether accelerate's hooks wrap ``module``'s forward (a model loaded with
    ``device_map``, or offloaded): the forward moves its inputs to the module's device and
    may load its weights only for the call (they are on the meta device before and after).
    Such a linear runs unchanged, on the graph, so that its backward keeps the weight it
    used."""
    return getattr(module, "_hf_hook", None) is not None


def linear_input_grad_hooks(
    token_dim: Optional[int] = None,
) -> Tuple[Callable[..., Any], Callable[..., Any]]:
    """A forward pre-hook and a forward hook for an ``nn.Linear`` inside a selected block
    on the lean route: the same output, and a backward that computes only what LeGrad needs.

    The pre-hook runs the linear without a graph; the hook (register it with
    ``always_call=True``) restores the grad mode and, where gradients flow, returns the
    output through :class:`LinearInputGrad`.

    ``token_dim``: for the block's last MLP linear under a token-mean readout, the token
    dimension of its input: its backward is then one row per sample (see the module doc).
    """
    modes = LinearModes()  # grad mode before each (possibly nested) call of the linear

    def pre_hook(module: nn.Module, args: Tuple[Any, ...]) -> None:
        if not dispatched(module):
            modes.push()

    def hook(module: nn.Module, args: Tuple[Any, ...], output: Any) -> Any:
        if dispatched(module):
            return None  # it ran as it is, on the graph: its backward has its own weight
        enabled = modes.pop()
        if not (enabled and isinstance(output, Tensor) and args):
            return None
        inputs = args[0]
        if not (isinstance(inputs, Tensor) and inputs.requires_grad):
            return None
        linear: Any = module
        return LinearInputGrad.apply(inputs, [output], linear.weight, token_dim)

    return pre_hook, hook
