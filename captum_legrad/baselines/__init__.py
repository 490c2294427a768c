"""Baseline attribution methods beside LeGrad, all with Captum's ``attribute`` interface.

Every class subclasses a Captum ``Attribution`` and has ``attribute(inputs, target=...,
additional_forward_args=..., output="input")`` returning maps of the input's shape (one map
per image, repeated over the channels), or ``output="map"`` for ``(B, 1, H, W)``.

Gradient methods (Captum's, summed over channels): :class:`SaliencyMap`,
:class:`InputXGradientMap`, :class:`IntegratedGradientsMap` (and :class:`ChannelSummed` for
any other). Attention methods, reusing :func:`~captum_legrad.discover` and
:func:`~captum_legrad.internals.record_attention`: :class:`RawAttention`,
:class:`AttentionRollout`, :class:`GenericAttention` (Chefer et al. 2021) and
:class:`ViTGradCAM`.
"""

from .attention import AttentionRollout, GenericAttention, RawAttention, ViTGradCAM
from .gradients import ChannelSummed, InputXGradientMap, IntegratedGradientsMap, SaliencyMap

__all__ = [
    "AttentionRollout",
    "ChannelSummed",
    "GenericAttention",
    "InputXGradientMap",
    "IntegratedGradientsMap",
    "RawAttention",
    "SaliencyMap",
    "ViTGradCAM",
]
