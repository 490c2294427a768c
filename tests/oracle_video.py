"""Independent LeGrad oracle for the HF video classifiers and the Audio Spectrogram
Transformer (issue #22), written from docs/method.md.

It imports nothing from ``captum_legrad``. The model must use the **eager** attention (the
tests build an eager twin with the same weights). One forward keeps, by forward hooks on
HF's own modules, every layer's output ``Z^l`` and the tensor its attention multiplies with
``V``: the ``attn_weights`` the attention module returns (``output_attentions``' tensor),
or for TimeSformer, which returns no weights from its temporal attention, the output of
its ``attn_drop`` (an identity in eval mode, applied to the softmax and multiplied with
``V``). Then, per layer:

1. ``s^l = sum_b readout(Z^l)[b, target]``, the readouts written out here from the model's
   modules;
2. ``G = autograd.grad(s^l, A)`` for each attention ``A`` of block ``l`` (TimeSformer: the
   temporal and the spatial one; V-JEPA 2: the attentive pooler's cross-attention run on
   ``Z^l``);
3. ReLU, mean over heads and query rows, prefix keys dropped, values placed on the grid by
   hand from how the model orders its tokens; a block's two maps (TimeSformer) summed.
"""

from __future__ import annotations

from typing import Any, Callable, List

import torch
from torch import Tensor, nn

__all__ = ["layer_maps", "readout"]


def _name(model: nn.Module) -> str:
    return type(model).__name__


def _base(model: Any) -> Any:
    for name in ("videomae", "vivit", "timesformer", "audio_spectrogram_transformer", "vjepa2"):
        if hasattr(model, name):
            return getattr(model, name)
    raise AssertionError(_name(model))


def _layers(model: Any) -> List[nn.Module]:
    base = _base(model)
    if hasattr(base, "layers"):
        return list(base.layers)
    return list(base.encoder.layer)


def readout(model: Any, pooling: str) -> Callable[[Tensor], Tensor]:
    """``Z (B, N, D)`` → logits, per docs/method.md and the model's own head."""
    name, base = _name(model), _base(model)
    if name.startswith("VideoMAE"):
        if model.fc_norm is not None:
            return lambda z: model.classifier(model.fc_norm(z.mean(1)))
        if pooling == "model":
            return lambda z: model.classifier(base.layernorm(z)[:, 0])
        return lambda z: model.classifier(base.layernorm(z.mean(1)))
    if name.startswith(("Vivit", "Timesformer")):
        if pooling == "model":
            return lambda z: model.classifier(base.layernorm(z)[:, 0])
        return lambda z: model.classifier(base.layernorm(z.mean(1)))
    if name.startswith("AST"):
        if pooling == "model":

            def both(z: Tensor) -> Tensor:
                y = base.layernorm(z)
                return model.classifier((y[:, 0] + y[:, 1]) / 2)

            return both
        return lambda z: model.classifier(base.layernorm(z.mean(1)))
    raise AssertionError(name)


def _relu_mean(grad: Tensor) -> Tensor:
    """(rows, heads, Q, K) → (rows, K)."""
    return grad.clamp(min=0).mean(dim=(1, 2))


def layer_maps(model: Any, x: Tensor, target: int, pooling: str = "mean") -> Tensor:
    """Per-layer maps ``(B, L, *grid)``."""
    name = _name(model)
    layers = _layers(model)
    outputs: List[Tensor] = []
    attentions: List[List[Tensor]] = [[] for _ in layers]
    handles = []

    def keep_output(module: nn.Module, args: Any, out: Any) -> None:
        outputs.append(out[0] if isinstance(out, tuple) else out)

    def keep_weights(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            attentions[index].append(out[1] if isinstance(out, tuple) else out)

        return hook

    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(keep_output))
        block: Any = layer
        if name.startswith("Timesformer"):
            attentions_of = [block.attention]  # joint space-time: one attention
            if hasattr(block, "temporal_attention"):  # divided: temporal, then spatial
                attentions_of = [block.temporal_attention, block.attention]
            for attention in attentions_of:
                drop = attention.attention.attn_drop
                handles.append(drop.register_forward_hook(keep_weights(index)))
        elif not name.startswith("VJEPA2"):
            inner = block.attention
            inner = inner.attention if hasattr(inner, "attention") else inner
            handles.append(inner.register_forward_hook(keep_weights(index)))
    try:
        with torch.enable_grad():
            model(x)
            if name.startswith("VJEPA2"):
                return _vjepa2_maps(model, x, outputs, target)
            score_of = readout(model, pooling)
            maps = []
            for index, z in enumerate(outputs):
                score = score_of(z)[:, target].sum()
                grads = torch.autograd.grad(score, attentions[index], retain_graph=True)
                maps.append(_place(model, x, [_relu_mean(g) for g in grads]))
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(maps, dim=1).detach()


def _place(model: Any, x: Tensor, reduced: List[Tensor]) -> Tensor:
    """Key values → the grid, from each model's token order."""
    name, config, b = _name(model), model.config, x.shape[0]
    if name.startswith("AST"):
        p = config.patch_size
        f = (config.num_mel_bins - p) // config.frequency_stride + 1
        t = (config.max_length - p) // config.time_stride + 1
        return reduced[0][:, 2:].reshape(b, f, t)  # CLS, distillation; frequency-major
    if name.startswith("Timesformer"):
        frames, h, w = x.shape[1], x.shape[3] // config.patch_size, x.shape[4] // config.patch_size
        if len(reduced) == 1:  # joint: CLS, then tokens (position, frame), position-major
            joint = reduced[0][:, 1:].reshape(b, h * w, frames).transpose(1, 2)
            return joint.reshape(b, frames, h, w)
        temporal = reduced[0].reshape(b, h * w, frames).transpose(1, 2)  # rows (b, position)
        spatial = reduced[1].reshape(b, frames, 1 + h * w)[:, :, 1:]  # rows (b, frame), CLS
        return (temporal + spatial).reshape(b, frames, h, w)
    if name.startswith("VideoMAE"):
        tub, p = config.tubelet_size, config.patch_size
        grid = (x.shape[1] // tub, x.shape[3] // p, x.shape[4] // p)
        return reduced[0].reshape(b, *grid)
    if name.startswith("Vivit"):
        tub = config.tubelet_size
        grid = (x.shape[1] // tub[0], x.shape[3] // tub[1], x.shape[4] // tub[2])
        return reduced[0][:, 1:].reshape(b, *grid)
    raise AssertionError(name)


def _vjepa2_maps(model: Any, x: Tensor, outputs: List[Tensor], target: int) -> Tensor:
    """The attentive pooler's cross-attention on each layer's tokens (after the encoder's
    final norm), differentiated; its one latent query, no prefix tokens."""
    config = model.config
    grid = (
        x.shape[1] // config.tubelet_size,
        x.shape[3] // config.patch_size,
        x.shape[4] // config.patch_size,
    )
    cross = model.pooler.cross_attention_layer.cross_attn
    maps = []
    kept: List[Tensor] = []
    for z in outputs:
        kept.clear()
        handle = cross.register_forward_hook(lambda m, a, out: kept.append(out[1]))
        try:
            pooled = model.pooler(model.vjepa2.encoder.layernorm(z))
        finally:
            handle.remove()
        score = model.classifier(pooled)[:, target].sum()
        (grad,) = torch.autograd.grad(score, kept, retain_graph=True)
        maps.append(_relu_mean(grad).reshape(x.shape[0], *grid))
    return torch.stack(maps, dim=1).detach()
