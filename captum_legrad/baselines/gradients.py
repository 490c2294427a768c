"""Captum's gradient methods as image maps: attributions summed over the colour channels.

:class:`ChannelSummed` wraps any Captum attribution whose output has the input's shape and
sums it over the channels, so it returns one map per image like LeGrad. The three wrappers
the evaluation harness uses are :class:`SaliencyMap` (absolute gradients, Captum's
``Saliency``), :class:`InputXGradientMap` and :class:`IntegratedGradientsMap`.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

from captum._utils.typing import TargetType
from captum.attr import (
    Attribution,
    GradientAttribution,
    InputXGradient,
    IntegratedGradients,
    Saliency,
)
from torch import Tensor

__all__ = ["ChannelSummed", "SaliencyMap", "InputXGradientMap", "IntegratedGradientsMap"]


class ChannelSummed(GradientAttribution):
    r"""A Captum attribution summed over the input's channel dimension.

    Args:
        forward_func (Callable): The model.
        method (Attribution): A Captum attribution of the same model whose output has the
                    input's shape ``(B, C, H, W)``.
        name (str, optional): What :meth:`get_name` returns.
                    Default: the wrapped method's name
        **attribute_kwargs: Fixed keyword arguments for ``method.attribute``.

    Examples::

        >>> from captum.attr import Saliency
        >>> maps = ChannelSummed(model, Saliency(model)).attribute(x, target=3, output="map")
    """

    def __init__(
        self,
        forward_func: Callable[..., Tensor],
        method: Attribution,
        name: Optional[str] = None,
        **attribute_kwargs: Any,
    ) -> None:
        GradientAttribution.__init__(self, forward_func)
        self.method = method
        self._name = name if name is not None else method.get_name()
        self.attribute_kwargs: Dict[str, Any] = attribute_kwargs

    def get_name(self) -> str:
        return self._name

    def attribute_future(self) -> None:
        raise NotImplementedError("attribute_future is not implemented for ChannelSummed")

    def attribute(
        self,
        inputs: Tensor,
        target: TargetType = None,
        additional_forward_args: Optional[object] = None,
        *,
        output: str = "input",
        **kwargs: Any,
    ) -> Tensor:
        r"""
        Args:

            inputs (Tensor): Images ``(B, C, H, W)``.
            target (int, tuple, Tensor, or list, optional): Output indices to explain, with
                        Captum's meaning.
                        Default: None
            additional_forward_args (Any, optional): Passed to the model after the images.
                        Default: None
            output (str, optional): ``"input"``: the channel sum repeated over the channels
                        ``(B, C, H, W)``; ``"map"``: ``(B, 1, H, W)``.
                        Default: "input"
            **kwargs: Further keyword arguments for the wrapped method's ``attribute``.

        Returns:
            *Tensor* of **attributions**, detached.
        """
        if output not in ("input", "map"):
            raise ValueError(f"output must be 'input' or 'map', got {output!r}.")
        attr = self.method.attribute(
            inputs.detach().requires_grad_(),  # a leaf: Captum warns about anything else
            target=target,
            additional_forward_args=additional_forward_args,
            **{**self.attribute_kwargs, **kwargs},
        )
        summed = attr.sum(dim=1, keepdim=True).detach()
        if output == "map":
            return summed
        return summed.expand_as(inputs).contiguous()


class SaliencyMap(ChannelSummed):
    """Captum's ``Saliency`` (absolute input gradients), summed over channels."""

    def __init__(self, forward_func: Callable[..., Tensor]) -> None:
        super().__init__(forward_func, Saliency(forward_func), name="Saliency")


class InputXGradientMap(ChannelSummed):
    """Captum's ``InputXGradient``, summed over channels."""

    def __init__(self, forward_func: Callable[..., Tensor]) -> None:
        super().__init__(forward_func, InputXGradient(forward_func), name="InputXGradient")


class IntegratedGradientsMap(ChannelSummed):
    """Captum's ``IntegratedGradients`` (zero baseline), summed over channels.

    Args:
        forward_func (Callable): The model.
        n_steps (int, optional): Integration steps.
                    Default: 20
        internal_batch_size (int, optional): Forward batch size inside Captum.
                    Default: 256
    """

    def __init__(
        self,
        forward_func: Callable[..., Tensor],
        n_steps: int = 20,
        internal_batch_size: Optional[int] = 256,
    ) -> None:
        super().__init__(
            forward_func,
            IntegratedGradients(forward_func),
            name="IntegratedGradients",
            n_steps=n_steps,
            internal_batch_size=internal_batch_size,
        )
