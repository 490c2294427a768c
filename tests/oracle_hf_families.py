"""Independent LeGrad oracle for the HF families of issue #10, written from docs/method.md.

Like ``tests/oracle_hf.py`` it imports nothing from ``captum_legrad`` and obtains the
attention probabilities from HF itself: the model given to it must use the **eager**
attention implementation (the tests build an eager twin with the same weights) and is run
with ``output_attentions=True, output_hidden_states=True``. ``hidden_states[l + 1]`` is
``Z^l``, ``attentions[l]`` is ``A^l`` (its graph is checked). Then, one layer at a time:

1. ``s^l = sum_b readout(Z^l)[b, target_b]`` with the readouts written out by hand below,
   optionally followed by the cosine with text embeddings;
2. ``G^l = autograd.grad(s^l, A^l)``; for AIMv2's attention-pooling head ``A^l`` is the
   head's attention on ``Z^l``, computed by hand from its weights with an explicit softmax;
3. ReLU, mean over heads and query rows, the patch keys in image order (ViT-MAE: the keys
   are in the order the model's ``noise`` put the patches in, undone with ``ids_restore``),
   reshaped to the grid;
4. sum the layers, bilinear upsampling, per-sample min-max (``finalize`` of ``oracle_hf``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["aimv2_head_by_hand", "family_readout", "oracle_layer_maps", "num_prefix"]


def _name(model: nn.Module) -> str:
    return type(model).__name__


def num_prefix(model: nn.Module) -> int:
    """CLS, distillation and register tokens before the patches."""
    name = _name(model)
    if name.startswith(("IJepa", "Aimv2")):
        return 0
    if name.startswith("DeiT"):
        return 2
    if name.startswith("DINOv3"):
        return 1 + int(model.config.num_register_tokens)
    return 1


def _patch(model: nn.Module) -> int:
    config = model.config
    config = getattr(config, "vision_config", None) or config
    return int(config.patch_size)


def aimv2_head_by_hand(head: Any, feats: Tensor) -> tuple[Tensor, Tensor]:
    """AIMv2's ``Aimv2AttentionPoolingHead`` from its weights: ``(pooled, attn (B, H, 1, N))``."""
    b, n, d = feats.shape
    heads = head.num_heads
    hd = d // heads
    k = head.k_proj(feats).view(b, n, heads, hd).transpose(1, 2)
    v = head.v_proj(feats).view(b, n, heads, hd).transpose(1, 2)
    q = head.cls_token.expand(b, -1, -1).view(b, 1, heads, hd).transpose(1, 2)
    attn = torch.softmax((q @ k.transpose(-2, -1)) * hd**-0.5, dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(b, 1, d).mean(dim=1)
    return head.output_proj(out), attn


def _beit_pool(model: Any, base: Any, z: Tensor, mean: bool) -> Tensor:
    """BEiT / data2vec pooling by hand: patch mean + the pooler's norm, or the CLS token."""
    use_mean = bool(model.config.use_mean_pooling)
    if mean:
        pooled = base.layernorm(z.mean(dim=1))
        return base.pooler.layernorm(pooled) if use_mean else pooled
    normed = base.layernorm(z)
    return base.pooler.layernorm(normed[:, 1:].mean(dim=1)) if use_mean else normed[:, 0]


def family_readout(model: nn.Module, z: Tensor, pooling: str) -> tuple[Tensor, Optional[Tensor]]:
    """``readout(Z)`` for the classes of issue #10: ``(scores, pooler attention or None)``."""
    m: Any = model
    name = _name(model)
    mean = pooling == "mean"
    if name == "DeiTForImageClassificationWithTeacher":
        if mean:
            n = m.deit.layernorm(z.mean(dim=1))
            return (m.cls_classifier(n) + m.distillation_classifier(n)) / 2, None
        y = m.deit.layernorm(z)
        return (m.cls_classifier(y[:, 0]) + m.distillation_classifier(y[:, 1])) / 2, None
    if name in ("DeiTForImageClassification", "ViTMSNForImageClassification"):
        base = m.deit if name.startswith("DeiT") else m.vit
        pooled = base.layernorm(z.mean(dim=1)) if mean else base.layernorm(z)[:, 0]
        return m.classifier(pooled), None
    if name in ("DeiTModel", "ViTMSNModel", "ViTMAEModel", "DINOv3ViTModel"):
        norm = m.norm if name == "DINOv3ViTModel" else m.layernorm
        pooled = norm(z.mean(dim=1)) if mean else norm(z)[:, 0]
        pooler = getattr(m, "pooler", None)
        if pooler is not None:
            pooled = pooler.activation(pooler.dense(pooled))
        return pooled, None
    if name in ("BeitForImageClassification", "Data2VecVisionForImageClassification"):
        base = m.beit if name.startswith("Beit") else m.data2vec_vision
        return m.classifier(_beit_pool(m, base, z, mean)), None
    if name in ("BeitModel", "Data2VecVisionModel"):
        return _beit_pool(m, m, z, mean), None
    if name in ("IJepaForImageClassification", "IJepaModel"):
        base = m.ijepa if name == "IJepaForImageClassification" else m
        pooled = base.layernorm(z.mean(dim=1)) if mean else base.layernorm(z).mean(dim=1)
        return (m.classifier(pooled) if base is not m else pooled), None
    if name in ("Aimv2VisionModel", "Aimv2Model"):
        tower = m.vision_model if name == "Aimv2Model" else m
        pooled, attn = aimv2_head_by_hand(tower.head, tower.rms_norm(z))
        if name == "Aimv2Model":
            pooled = m.visual_projection(pooled)
        return pooled, attn
    if name == "MetaClip2ForImageClassification":
        return m.classifier(z.mean(dim=1) if mean else z[:, 1:].mean(dim=1)), None
    if name.startswith("MetaClip2"):
        tower = m.vision_model if hasattr(m, "vision_model") else m
        pooled = tower.post_layernorm(z.mean(dim=1) if mean else z[:, 0])
        if hasattr(m, "visual_projection"):
            pooled = m.visual_projection(pooled)
        return pooled, None
    raise NotImplementedError(f"oracle_hf_families does not know {name}")


def _run(model: nn.Module, x: Tensor, noise: Optional[Tensor], kwargs: dict) -> Any:
    m: Any = model
    flags = dict(output_attentions=True, output_hidden_states=True, **kwargs)
    if _name(model) in ("Aimv2Model", "MetaClip2Model"):
        return m.vision_model(x, **flags)
    if _name(model) == "ViTMAEModel":
        return m(x, noise=noise, **flags)
    return m(x, **flags)


def oracle_layer_maps(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    layers: Sequence[int] | None = None,
    pooling: str = "mean",
    *,
    noise: Optional[Tensor] = None,
    text: Optional[Tensor] = None,
    project: Optional[Callable[[Tensor], Tensor]] = None,
    forward_kwargs: Optional[dict] = None,
) -> Tensor:
    """Per-layer maps ``(B, n_layers, g_h, g_w)``, unnormalised, for an **eager** ``model``.

    ``noise``: ViT-MAE's noise (default: the image order, ``0, 1, 2, ...``).
    """
    assert pooling in ("mean", "model")
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            assert config._attn_implementation == "eager", "the oracle needs an eager model"
    target = torch.as_tensor(target, dtype=torch.long).reshape(-1)
    patch = _patch(model)
    g_h, g_w = x.shape[-2] // patch, x.shape[-1] // patch
    n_prefix = num_prefix(model)
    ids_restore = None
    if _name(model) == "ViTMAEModel":
        if noise is None:
            noise = torch.arange(g_h * g_w, dtype=torch.float32).expand(x.shape[0], -1)
        ids_restore = torch.argsort(torch.argsort(noise, dim=1), dim=1)
    maps = []
    with torch.enable_grad():
        out = _run(model, x.detach().clone(), noise, forward_kwargs or {})
        attentions, hidden = out.attentions, out.hidden_states
        assert len(hidden) == len(attentions) + 1
        chosen = range(len(attentions)) if layers is None else [i % len(attentions) for i in layers]
        for l_idx in chosen:
            scores, pool_attn = family_readout(model, hidden[l_idx + 1], pooling)
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
            if ids_restore is not None:  # image position p sits at key 1 + ids_restore[p]
                patches = e.gather(1, 1 + ids_restore)
            else:
                patches = e[:, n_prefix:]
            maps.append(patches.reshape(-1, g_h, g_w))
    return torch.stack(maps, dim=1).detach()
