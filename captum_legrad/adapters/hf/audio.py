"""Hugging Face ``transformers`` Audio Spectrogram Transformer (AST).

Recognised: ``ASTForAudioClassification`` and ``ASTModel`` (features). AST is a DeiT over
the patches of a log-mel spectrogram ``input_values`` ``(B, time, mel)``: square patches of
``patch_size`` cells taken every ``frequency_stride`` mel bins and every ``time_stride``
frames (10 < 16 in the released models: the patches overlap), tokens ordered frequency
first, after two prefix tokens (CLS and distillation: ``P = 2``). The map lives on the
``(F, T)`` patch grid, ``F = (mel − p) // frequency_stride + 1``,
``T = (time − p) // time_stride + 1``; ``output="map"`` / ``"input"`` give each spectrogram
cell the mean of the maps of the patches covering it (``ViTSpec.patch_stride``), in the
input's own layout ``(B, time, mel)``.

Readouts (``y = layernorm(Z)``; ``pooling="model"`` / ``pooling="mean"``):

- classification: ``classifier((y[:, 0] + y[:, 1]) / 2)`` / ``classifier(layernorm(mean Z))``
  (``classifier`` is AST's head: its own norm, then the linear layer);
- ``ASTModel``: ``(y[:, 0] + y[:, 1]) / 2`` (its ``pooler_output``) / ``layernorm(mean Z)``.

The position embedding is learned for ``max_length`` frames and ``num_mel_bins`` bins;
other spectrogram sizes are refused before the model runs (its feature extractor pads or
truncates to ``max_length``).
"""

from __future__ import annotations

import types
from typing import Any, Callable, Optional, Sequence, Tuple

from torch import Tensor, nn

from ...spec import InputAxes, TokenInput, ViTSpec
from ..common import mlp_outputs
from . import common

__all__ = ["match", "SPECTROGRAM_AXES"]

#: AST input ``(B, time, mel)``: its grid runs over frequency (dimension 2), then time.
SPECTROGRAM_AXES = InputAxes(grid=(2, 1), channels=None, name="spectrogram")


def _native_forward(model: nn.Module, frames: int, bins: int) -> Callable[..., Any]:
    """``model``'s forward, refusing other spectrogram sizes before it runs."""

    def forward(self: nn.Module, spectrogram: Tensor, *args: Any, **kwargs: Any) -> Any:
        time, mel = int(spectrogram.shape[1]), int(spectrogram.shape[2])
        if (time, mel) != (frames, bins):
            raise ValueError(
                f"This Audio Spectrogram Transformer was built for spectrograms of {frames} "
                f"frames x {bins} mel bins (max_length x num_mel_bins) and cannot resample "
                f"its position embedding to {time} x {mel}: pass input_values of shape (B, "
                f"{frames}, {bins}) (its feature extractor pads or truncates to max_length)."
            )
        return self(spectrogram, *args, **kwargs)

    return types.MethodType(forward, model)


def match(model: nn.Module) -> Optional[ViTSpec]:
    """Describe a transformers ``ASTForAudioClassification`` or ``ASTModel``; ``None``
    otherwise."""
    module = "audio_spectrogram_transformer.modeling_audio_spectrogram_transformer"
    m: Any = model
    if common.is_instance_of(model, module, "ASTForAudioClassification"):
        base: Any = m.audio_spectrogram_transformer
        head: Optional[nn.Module] = m.classifier
    elif common.is_instance_of(model, module, "ASTModel"):
        base, head = m, None
    else:
        return None
    config = base.config

    def apply(features: Tensor) -> Tensor:
        return head(features) if head is not None else features

    def prefix_mean(tokens: Tensor) -> Tensor:
        normed = base.layernorm(tokens)
        return apply((normed[:, 0] + normed[:, 1]) / 2)

    def mean_readout(tokens: Tensor) -> Tensor:
        return apply(base.layernorm(tokens.mean(dim=1)))

    p = int(config.patch_size)
    f_stride, t_stride = int(config.frequency_stride), int(config.time_stride)

    def grid(bins: int, frames: int) -> Tuple[int, int]:
        return (bins - p) // f_stride + 1, (frames - p) // t_stride + 1

    blocks: Sequence[Any] = common.layers_of(base)
    return ViTSpec(
        family="hf",
        token_mean_readout=True,
        root=base,
        blocks=tuple(blocks),
        attentions=tuple(block.attention for block in blocks),
        readout=mean_readout,
        model_readout=prefix_mean,
        num_prefix_tokens=2,
        patch_size=(p, p),
        patch_stride=(f_stride, t_stride),
        grid=grid,
        image_forward=_native_forward(model, int(config.max_length), int(config.num_mel_bins)),
        token_input=TokenInput("hidden_states"),
        input_axes=SPECTROGRAM_AXES,
        mlp_outputs=mlp_outputs(blocks, {"ASTLayer": ("mlp.fc2",)}),
    )
