"""Independent LeGrad oracle for Hugging Face transformers models, written from docs/method.md.

It imports nothing from ``captum_legrad`` and uses HF's own mechanism to obtain the
attention probabilities: a deep copy of the model is switched to the eager attention
implementation and run with ``output_attentions=True, output_hidden_states=True``. The
returned attentions are the post-softmax tensors multiplied with V (their graph is
checked), ``hidden_states[l + 1]`` is ``Z^l``. Then, one layer at a time:

1. ``s^l = sum_b readout(Z^l)[b, target_b]`` with the readouts written out by hand below
   (``pooling="mean"``: mean over all tokens, the final norm, the head; ``"model"``: the
   model's own readout), optionally followed by the cosine with text embeddings;
2. ``G^l = autograd.grad(s^l, A^l)``; for SigLIP's attention-pooling head, ``A^l`` is the
   head's attention on ``Z^l``, computed by hand from the ``nn.MultiheadAttention``
   weights with an explicit softmax;
3. ReLU, mean over heads and query rows, drop the ``P`` prefix keys, reshape to the grid;
4. sum the layers, bilinear upsampling (``align_corners=False``), per-sample min-max
   (zeros where constant).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
import transformers as tf
from torch import Tensor, nn

__all__ = [
    "finalize",
    "oracle_layer_maps",
    "oracle_legrad",
    "siglip_head_by_hand",
    "hf_readout",
    "vision_tower",
]

_POOLINGS = ("mean", "model")


# --------------------------------------------------------------------------------------------
# The model, made eager
# --------------------------------------------------------------------------------------------


def _eager_copy(model: nn.Module) -> nn.Module:
    work = copy.deepcopy(model)
    if hasattr(work, "set_attn_implementation"):
        work.set_attn_implementation("eager")
    else:  # older transformers: the attention function is read from the config per call
        for module in work.modules():
            config = getattr(module, "config", None)
            if config is not None:
                config._attn_implementation = "eager"
    return work.eval()


def vision_tower(model: nn.Module) -> Any:
    """The vision transformer that has ``embeddings``, ``encoder`` and a final norm."""
    vision: Any = model
    while not hasattr(vision, "post_layernorm"):
        vision = vision.vision_model
    return vision


def _cls(*names: str) -> tuple[type, ...]:
    """The named transformers classes this version has."""
    return tuple(getattr(tf, name) for name in names if hasattr(tf, name))


def _tower_call(work: nn.Module) -> Callable[..., Any]:
    """The module whose call returns the vision ``hidden_states`` and ``attentions``."""
    if isinstance(work, _cls("CLIPModel", "SiglipModel")):
        return work.vision_model
    return work


def _num_prefix(model: nn.Module) -> int:
    if isinstance(model, _cls("SiglipModel", "SiglipVisionModel", "SiglipForImageClassification")):
        return 0
    config = model.config
    return 1 + int(getattr(config, "num_register_tokens", 0) or 0)


def _patch_size(model: nn.Module) -> tuple[int, int]:
    config = model.config
    config = getattr(config, "vision_config", None) or config
    size = config.patch_size
    if isinstance(size, (tuple, list)):
        return int(size[0]), int(size[1])
    return int(size), int(size)


# --------------------------------------------------------------------------------------------
# Readouts, by hand
# --------------------------------------------------------------------------------------------


def siglip_head_by_hand(head: Any, feats: Tensor) -> tuple[Tensor, Tensor]:
    """SigLIP's ``SiglipMultiheadAttentionPoolingHead`` from its weights.

    Returns ``(pooled (B, D), attn (B, heads, 1, N))``, ``attn`` the softmax multiplied with V.
    """
    b, n, d = feats.shape
    mha = head.attention
    heads = mha.num_heads
    hd = d // heads
    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
    probe = head.probe.expand(b, -1, -1)
    q = F.linear(probe, w_q, b_q).view(b, 1, heads, hd).transpose(1, 2)
    k = F.linear(feats, w_k, b_k).view(b, n, heads, hd).transpose(1, 2)
    v = F.linear(feats, w_v, b_v).view(b, n, heads, hd).transpose(1, 2)
    attn = torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(hd), dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(b, 1, d)
    out = mha.out_proj(out)
    out = out + head.mlp(head.layernorm(out))
    return out[:, 0], attn


def hf_readout(model: nn.Module, z: Tensor, pooling: str) -> tuple[Tensor, Optional[Tensor]]:
    """``readout(Z)`` for the supported HF classes: ``(scores, pooler attention or None)``."""
    m: Any = model
    mean = pooling == "mean"
    if isinstance(model, _cls("ViTForImageClassification")):
        if mean:
            return m.classifier(m.vit.layernorm(z.mean(dim=1))), None
        return m.classifier(m.vit.layernorm(z)[:, 0]), None
    if isinstance(model, _cls("ViTModel")):
        if mean:
            pooled = m.layernorm(z.mean(dim=1))
        else:
            pooled = m.layernorm(z)[:, 0]
        if m.pooler is not None:
            pooled = m.pooler.activation(m.pooler.dense(pooled))
        return pooled, None
    if isinstance(model, _cls("CLIPForImageClassification")):
        if mean:
            return m.classifier(z.mean(dim=1)), None
        return m.classifier(z[:, 1:].mean(dim=1)), None
    if isinstance(model, _cls("CLIPModel", "CLIPVisionModel", "CLIPVisionModelWithProjection")):
        vision = vision_tower(model)
        pooled = vision.post_layernorm(z.mean(dim=1) if mean else z[:, 0])
        if hasattr(m, "visual_projection"):
            pooled = m.visual_projection(pooled)
        return pooled, None
    if isinstance(
        model, _cls("Dinov2ForImageClassification", "Dinov2WithRegistersForImageClassification")
    ):
        base = getattr(m, "dinov2", None) or m.dinov2_with_registers
        if mean:
            pooled = base.layernorm(z.mean(dim=1))
            return m.classifier(torch.cat([pooled, pooled], dim=1)), None
        normed = base.layernorm(z)
        # transformers < 4.52 averaged the registers with the patches (PR #37836 fixed it)
        version = tuple(int(p) for p in tf.__version__.split(".")[:2])
        patches = normed[:, _num_prefix(model) if version >= (4, 52) else 1 :].mean(dim=1)
        return m.classifier(torch.cat([normed[:, 0], patches], dim=1)), None
    if isinstance(model, _cls("Dinov2Model", "Dinov2WithRegistersModel")):
        return (m.layernorm(z.mean(dim=1)) if mean else m.layernorm(z)[:, 0]), None
    if isinstance(model, _cls("SiglipForImageClassification")):
        norm = vision_tower(model).post_layernorm
        if mean:
            return m.classifier(norm(z.mean(dim=1))), None
        # transformers < 4.43 averaged the tokens from the second on (no class token there)
        version = tuple(int(p) for p in tf.__version__.split(".")[:2])
        return m.classifier(norm(z)[:, 0 if version >= (4, 43) else 1 :].mean(dim=1)), None
    if isinstance(model, _cls("SiglipModel", "SiglipVisionModel")):
        vision = vision_tower(model)
        if getattr(vision, "use_head", hasattr(vision, "head")):
            return siglip_head_by_hand(vision.head, vision.post_layernorm(z))
        if mean:
            return vision.post_layernorm(z.mean(dim=1)), None
        return vision.post_layernorm(z).mean(dim=1), None
    raise NotImplementedError(f"oracle_hf does not know {type(model).__name__}")


# --------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------


def _resolve_layers(num_blocks: int, layers: Sequence[int] | None) -> list[int]:
    if layers is None:
        return list(range(num_blocks))
    return [int(i) % num_blocks for i in layers]


def oracle_layer_maps(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    layers: Sequence[int] | None = None,
    pooling: str = "mean",
    *,
    forward_kwargs: Optional[dict] = None,
    text: Optional[Tensor] = None,
    project: Optional[Callable[[Tensor], Tensor]] = None,
) -> Tensor:
    """Per-layer maps ``(B, n_layers, g_h, g_w)``, unnormalised.

    ``forward_kwargs`` go to the vision forward (``interpolate_pos_encoding=True``);
    ``text`` ``(K, D)``: the score is the cosine of the readout with each row.
    """
    if pooling not in _POOLINGS:
        raise ValueError(pooling)
    target = torch.as_tensor(target, dtype=torch.long).reshape(-1)
    assert target.shape[0] == x.shape[0]
    work = _eager_copy(model)
    p_h, p_w = _patch_size(work)
    g_h, g_w = x.shape[-2] // p_h, x.shape[-1] // p_w
    n_prefix = _num_prefix(work)
    x_in = x.detach().clone().requires_grad_(True)
    maps = []
    with torch.enable_grad():
        out = _tower_call(work)(
            x_in, output_attentions=True, output_hidden_states=True, **(forward_kwargs or {})
        )
        attentions, hidden = out.attentions, out.hidden_states
        assert len(hidden) == len(attentions) + 1
        for l_idx in _resolve_layers(len(attentions), layers):
            z = hidden[l_idx + 1]
            scores, pool_attn = hf_readout(work, z, pooling)
            attn = attentions[l_idx] if pool_attn is None else pool_attn
            assert attn.grad_fn is not None, "the attention is not on the graph"
            assert attn.shape[-1] == n_prefix + g_h * g_w
            if text is not None:
                scores = F.normalize(scores, dim=-1) @ F.normalize(text, dim=-1).T
            if project is not None:  # (B, D) embedding -> (B, K) scores
                scores = project(scores)
            score = scores.gather(1, target.view(-1, 1)).sum()
            (grad,) = torch.autograd.grad(score, attn, retain_graph=True)
            e = grad.clamp(min=0).mean(dim=1).mean(dim=1)  # heads, then query rows
            maps.append(e[:, n_prefix:].reshape(-1, g_h, g_w))
    return torch.stack(maps, dim=1).detach()


def finalize(per_layer: Tensor, size: tuple[int, int]) -> Tensor:
    """Per-layer maps ``(B, L, g_h, g_w)`` → final maps ``(B, 1, H, W)``: sum, upsample,
    per-sample min-max."""
    summed = per_layer.sum(dim=1, keepdim=True)
    up = F.interpolate(summed, size=size, mode="bilinear", align_corners=False)
    out = torch.zeros_like(up)
    for b in range(up.shape[0]):
        lo, hi = up[b].min(), up[b].max()
        if hi > lo:
            out[b] = (up[b] - lo) / (hi - lo)
    return out


def oracle_legrad(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    layers: Sequence[int] | None = None,
    pooling: str = "mean",
    **kwargs: Any,
) -> Tensor:
    """Final LeGrad map ``(B, 1, H, W)``."""
    per_layer = oracle_layer_maps(model, x, target, layers, pooling, **kwargs)
    return finalize(per_layer, (int(x.shape[-2]), int(x.shape[-1])))
