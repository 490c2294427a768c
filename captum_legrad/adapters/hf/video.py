"""Hugging Face ``transformers`` video classifiers: VideoMAE, ViViT, TimeSformer and V-JEPA 2.

Recognised (transformers 5.x; the classes each installed version has):

* ``VideoMAEForVideoClassification``, ``VideoMAEModel`` (tubelets, no CLS token: ``P = 0``);
* ``VivitForVideoClassification``, ``VivitModel`` (tubelets and a CLS token: ``P = 1``);
* ``TimesformerForVideoClassification``, ``TimesformerModel`` (one frame per patch, a CLS
  token; ``attention_type="divided_space_time"``: each block's temporal and spatial
  attention are both LeGrad attentions (:attr:`~captum_legrad.ViTSpec.sites`, the block's
  map their sum); the
  ``"joint_space_time"`` variant is one attention per block over all tokens, laid out from
  TimeSformer's position-major token order; ``"space_only"``, which returns one output per
  frame, is refused);
* ``VJEPA2ForVideoClassification`` (3-D RoPE; its attentive pooler is the readout, and
  its cross-attention is the differentiated attention, as for SigLIP's MAP head).

Every one takes the video as ``(B, T, C, H, W)`` (``pixel_values``; V-JEPA 2's
``pixel_values_videos``); the map lives on the tubelet grid ``(T / tubelet, H / p, W / p)``
(:class:`~captum_legrad.spec.InputAxes` ``grid=(1, 3, 4)``, channels on dimension 2).

Readouts (``y = norm(Z)``, ``n = norm(mean over all tokens of Z)``; ``pooling="model"`` /
``pooling="mean"``):

- VideoMAE with ``use_mean_pooling`` (the released classifiers): ``classifier(fc_norm(Z.mean(1)))``
  for both (its own pooling is the mean over all tokens); without it:
  ``classifier(y[:, 0])`` / ``classifier(n)`` (``y`` through the model's ``layernorm``);
- ViViT, TimeSformer: ``classifier(y[:, 0])`` / ``classifier(n)``;
- V-JEPA 2: ``classifier(pooler(y))`` for both (an attention pool has no mean-pooled
  variant); ``y`` through the encoder's final ``layernorm``.
- The base models (``VideoMAEModel``, ``VivitModel``, ``TimesformerModel``) return
  features (``scores_are_features``): their readouts are the classifiers' without the head
  (``y[:, 0]`` / ``n``; VideoMAE: ``y.mean(1)`` / ``n``, or ``Z.mean(1)`` / ``mean Z``
  without a final norm).

Input sizes: these models learn their position embedding for the frame count and frame size
of their configuration (V-JEPA 2 computes its RoPE positions from the configured crop size,
for any frame count), and none of them resamples it for video; LeGrad runs them at that size
only and refuses others with one line saying which size to give (before the model runs).
"""

from __future__ import annotations

import types
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ...errors import CaptureError, UnsupportedModelError
from ...spec import AttentionSite, InputAxes, PatchLayout, TokenInput, ViTSpec
from ..common import mlp_outputs, pair
from . import common

__all__ = ["match", "VIDEO_AXES"]

Readout = Callable[[Tensor], Tensor]

#: HF video input ``(B, T, C, H, W)``: the grid's axes are frames, height, width.
VIDEO_AXES = InputAxes(grid=(1, 3, 4), channels=2, name="video")

#: The last MLP linear of each layer class (its output is ``x + t(W h + b)``).
_MLP_OUTPUTS: Mapping[str, Sequence[str]] = {
    "VideoMAELayer": ("output.dense",),
    "VivitLayer": ("mlp.fc2",),
    "TimesformerLayer": ("output.dense",),
    "VJEPA2Layer": ("mlp.fc2",),
}


def _native_forward(
    model: nn.Module, family: str, frames: Optional[int], size: Tuple[int, int]
) -> Callable[..., Any]:
    """``model``'s forward, refusing (before it runs) videos of another frame count or frame
    size than the configuration's: the position embedding is learned (or computed) for it."""

    def forward(self: nn.Module, video: Tensor, *args: Any, **kwargs: Any) -> Any:
        t, height, width = int(video.shape[1]), int(video.shape[-2]), int(video.shape[-1])
        if (frames is not None and t != frames) or (height, width) != size:
            want = f"{frames if frames is not None else 'T'}, C, {size[0]}, {size[1]}"
            raise ValueError(
                f"This {family} model was built for videos of "
                f"{'' if frames is None else f'{frames} frames of '}{size[0]}x{size[1]} pixels "
                f"and cannot resample its position embedding to {t} frames of "
                f"{height}x{width}: sample and resize the video to (B, {want}) (its video "
                "processor does this)."
            )
        return self(video, *args, **kwargs)

    return types.MethodType(forward, model)


def _tubelet_grid(patch: Tuple[int, int, int]) -> Callable[[int, int, int], Tuple[int, int, int]]:
    def grid(frames: int, height: int, width: int) -> Tuple[int, int, int]:
        return frames // patch[0], height // patch[1], width // patch[2]

    return grid


def _spec(
    root: nn.Module,
    blocks: Sequence[nn.Module],
    attentions: Sequence[nn.Module],
    readouts: Tuple[Readout, Optional[Readout]],
    prefix: int,
    patch: Tuple[int, int, int],
    forward: Callable[..., Any],
    **extra: Any,
) -> ViTSpec:
    model_readout, mean_readout = readouts
    fields: Dict[str, Any] = dict(
        family="hf",
        token_mean_readout=True,
        root=root,
        blocks=tuple(blocks),
        attentions=tuple(attentions),
        readout=mean_readout,
        model_readout=model_readout,
        num_prefix_tokens=prefix,
        patch_size=patch,
        grid=_tubelet_grid(patch),
        image_forward=forward,
        token_input=TokenInput("hidden_states"),
        input_axes=VIDEO_AXES,
        mlp_outputs=mlp_outputs(blocks, _MLP_OUTPUTS),
    )
    fields.update(extra)
    return ViTSpec(**fields)


def _cls_readouts(norm: nn.Module, head: Optional[nn.Module]) -> Tuple[Readout, Readout]:
    """``head(norm(Z)[:, 0])`` / ``head(norm(mean Z))`` (no head: the features)."""

    def apply(features: Tensor) -> Tensor:
        return head(features) if head is not None else features

    def model_readout(tokens: Tensor) -> Tensor:
        return apply(norm(tokens)[:, 0])

    def mean_readout(tokens: Tensor) -> Tensor:
        return apply(norm(tokens.mean(dim=1)))

    return model_readout, mean_readout


# ---------------------------------------------------------------------------- VideoMAE


def _match_videomae(model: nn.Module) -> Optional[ViTSpec]:
    module = "videomae.modeling_videomae"
    m: Any = model
    if common.is_instance_of(model, module, "VideoMAEForVideoClassification"):
        base: Any = m.videomae
        head: Optional[nn.Module] = m.classifier
        fc_norm: Optional[nn.Module] = m.fc_norm
    elif common.is_instance_of(model, module, "VideoMAEModel"):
        base, head, fc_norm = m, None, None
    else:
        return None
    config = base.config
    norm: Optional[nn.Module] = base.layernorm  # None with use_mean_pooling

    def apply(features: Tensor) -> Tensor:
        return head(features) if head is not None else features

    readouts: Tuple[Readout, Readout]
    if head is not None and fc_norm is not None:  # its own pooling is the token mean

        def pooled(tokens: Tensor) -> Tensor:
            return apply(fc_norm(tokens.mean(dim=1)))

        readouts = (pooled, pooled)
    elif head is not None and norm is not None:
        readouts = _cls_readouts(norm, head)
    else:  # the base model: its features are the (normalised) tokens, pooled by their mean
        final: Callable[[Tensor], Tensor] = norm if norm is not None else (lambda z: z)

        def own_mean(tokens: Tensor) -> Tensor:
            return final(tokens).mean(dim=1)

        def mean_then_norm(tokens: Tensor) -> Tensor:
            return final(tokens.mean(dim=1))

        readouts = (own_mean, mean_then_norm)
    patch = (int(config.tubelet_size), *pair(config.patch_size))
    blocks: Sequence[Any] = common.layers_of(base)
    return _spec(
        base,
        blocks,
        [common.attention_of(block, "attention") for block in blocks],
        readouts,
        0,
        patch,
        _native_forward(model, "VideoMAE", int(config.num_frames), pair(config.image_size)),
    )


# ---------------------------------------------------------------------------- ViViT


def _match_vivit(model: nn.Module) -> Optional[ViTSpec]:
    module = "vivit.modeling_vivit"
    m: Any = model
    if common.is_instance_of(model, module, "VivitForVideoClassification"):
        base: Any = m.vivit
        head: Optional[nn.Module] = m.classifier
    elif common.is_instance_of(model, module, "VivitModel"):
        base, head = m, None
    else:
        return None
    config = base.config
    tubelet = tuple(int(s) for s in config.tubelet_size)
    blocks: Sequence[Any] = common.layers_of(base)
    return _spec(
        base,
        blocks,
        [block.attention for block in blocks],
        _cls_readouts(base.layernorm, head),
        1,
        (tubelet[0], tubelet[1], tubelet[2]),
        _native_forward(model, "ViViT", int(config.num_frames), pair(config.image_size)),
    )


# ---------------------------------------------------------------------------- TimeSformer


def _temporal_layout(patch: int) -> Callable[[Tuple[Any, ...], int], PatchLayout]:
    """The temporal attention runs per spatial position: batch rows ``(b, position)``, keys
    the frames; cell ``(frame, row, column)`` is row ``position = row·w + column``, key
    ``frame``, i.e. value ``position·T + frame`` of the sample's ``n × T`` values."""

    def layout(inputs: Tuple[Any, ...], n_keys: int) -> PatchLayout:
        video = inputs[0]
        t, h, w = int(video.shape[1]), video.shape[-2] // patch, video.shape[-1] // patch
        if n_keys != t:
            raise CaptureError(
                f"TimeSformer's temporal attention has {n_keys} keys for {t} frames; "
                "LeGrad expects one key per frame."
            )
        frame = torch.arange(t).view(t, 1, 1)
        position = torch.arange(h * w).view(1, h, w)
        return PatchLayout((position * t + frame).flatten(), (t, h, w), rows=h * w)

    return layout


def _spatial_layout(patch: int) -> Callable[[Tuple[Any, ...], int], PatchLayout]:
    """The spatial attention runs per frame, over the frame's CLS copy and its patches:
    batch rows ``(b, frame)``, keys ``1 + position``; cell ``(frame, row, column)`` is value
    ``frame·(1 + n) + 1 + position`` of the sample's ``T × (1 + n)`` values."""

    def layout(inputs: Tuple[Any, ...], n_keys: int) -> PatchLayout:
        video = inputs[0]
        t, h, w = int(video.shape[1]), video.shape[-2] // patch, video.shape[-1] // patch
        if n_keys != 1 + h * w:
            raise CaptureError(
                f"TimeSformer's spatial attention has {n_keys} keys for a {h}x{w} patch grid; "
                "LeGrad expects the CLS token and one key per patch."
            )
        frame = torch.arange(t).view(t, 1)
        position = torch.arange(h * w).view(1, h * w)
        return PatchLayout((frame * (1 + h * w) + 1 + position).flatten(), (t, h, w), rows=t)

    return layout


def _joint_layout(patch: int) -> Callable[[Tuple[Any, ...], int], PatchLayout]:
    """Joint space-time attention: one attention over CLS and every (position, frame)
    token, position-major (TimeSformer's order): cell ``(frame, row, column)`` is key
    ``1 + position·T + frame``."""

    def layout(inputs: Tuple[Any, ...], n_keys: int) -> PatchLayout:
        video = inputs[0]
        t, h, w = int(video.shape[1]), video.shape[-2] // patch, video.shape[-1] // patch
        if n_keys != 1 + t * h * w:
            raise CaptureError(
                f"TimeSformer's attention has {n_keys} keys for {t} frames of a {h}x{w} patch "
                "grid; LeGrad expects the CLS token and one key per patch of every frame."
            )
        frame = torch.arange(t).view(t, 1, 1)
        position = torch.arange(h * w).view(1, h, w)
        return PatchLayout((1 + position * t + frame).flatten(), (t, h, w))

    return layout


def _match_timesformer(model: nn.Module) -> Optional[ViTSpec]:
    module = "timesformer.modeling_timesformer"
    m: Any = model
    if common.is_instance_of(model, module, "TimesformerForVideoClassification"):
        base: Any = m.timesformer
        head: Optional[nn.Module] = m.classifier
    elif common.is_instance_of(model, module, "TimesformerModel"):
        base, head = m, None
    else:
        return None
    config = base.config
    p = int(config.patch_size)
    size = pair(config.image_size)
    blocks: Sequence[Any] = common.layers_of(base)
    attentions = [block.attention.attention for block in blocks]
    extra: Dict[str, Any] = {}
    if config.attention_type == "space_only":
        raise UnsupportedModelError(
            f"{type(model).__name__} with attention_type='space_only' runs every frame as its "
            "own image (batch B·T) and returns one output per frame, not per video; LeGrad "
            "explains TimeSformer with 'divided_space_time' (the released models) or "
            "'joint_space_time' attention. Explain its frames as images with spec=ViTSpec(...)."
        )
    if config.attention_type == "joint_space_time":
        extra["layout"] = _joint_layout(p)
    if config.attention_type == "divided_space_time":
        temporal, spatial = _temporal_layout(p), _spatial_layout(p)
        extra["sites"] = {
            index: (
                AttentionSite(block.temporal_attention.attention, temporal),
                AttentionSite(block.attention.attention, spatial),
            )
            for index, block in enumerate(blocks)
        }
    norm: nn.Module = base.layernorm if base.layernorm is not None else nn.Identity()
    return _spec(
        base,
        blocks,
        attentions,
        _cls_readouts(norm, head),
        1,
        (1, p, p),
        _native_forward(model, "TimeSformer", int(config.num_frames), size),
        **extra,
    )


# ---------------------------------------------------------------------------- V-JEPA 2


def _match_vjepa2(model: nn.Module) -> Optional[ViTSpec]:
    module = "vjepa2.modeling_vjepa2"
    if not common.is_instance_of(model, module, "VJEPA2ForVideoClassification"):
        return None
    m: Any = model
    encoder: Any = m.vjepa2.encoder
    pooler: Any = m.pooler
    config = m.config
    pool: nn.Module = pooler.cross_attention_layer.cross_attn

    def pooled(tokens: Tensor) -> Tensor:
        return m.classifier(pooler(encoder.layernorm(tokens)))

    blocks: Sequence[Any] = tuple(encoder.layer)
    crop = int(config.crop_size)
    return _spec(
        m.vjepa2,
        blocks,
        [block.attention for block in blocks],
        (pooled, None),
        0,
        (int(config.tubelet_size), int(config.patch_size), int(config.patch_size)),
        # RoPE positions come from the configured crop size: any frame count, that size
        _native_forward(model, "V-JEPA 2", None, (crop, crop)),
        pool_attention=pool,
    )


_MATCHERS = (_match_videomae, _match_vivit, _match_timesformer, _match_vjepa2)


def match(model: nn.Module) -> Optional[ViTSpec]:
    """Describe a transformers VideoMAE, ViViT, TimeSformer or V-JEPA 2 model; ``None``
    otherwise."""
    for matcher in _MATCHERS:
        spec = matcher(model)
        if spec is not None:
            return spec
    return None
