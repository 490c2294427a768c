"""Independent LeGrad oracle for NaFlex models (HF SigLIP2, timm NaFlexVit), from docs/method.md.

It imports nothing from ``captum_legrad``. It never sees padding: each sample is explained
on its own, with only its valid patches (a batch of one, no mask), so the comparison with
a padded batch tests at once that padding keys are excluded and that a sample in a batch
gets what it gets alone. Then, one layer at a time:

1. ``s^l = readout(Z^l)[target]`` with the readouts written out by hand (``pooling="mean"``:
   mean over all tokens, the final norm, the head; ``"model"``: the model's own readout;
   attention pools computed by hand from their weights);
2. ``G^l = autograd.grad(s^l, A^l)``, ``A^l`` the explicit softmax multiplied with V
   (HF: ``output_attentions=True`` on an eager copy; timm: the blocks run by hand);
3. ReLU, mean over heads and query rows, the prefix keys dropped, each patch's value put
   at its own grid cell (timm: from ``patch_coord``; HF: row-major);
4. sum the layers, bilinear upsampling (``align_corners=False``) to the sample's own size
   ``grid · patch``, min-max (zeros where constant).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "siglip2_layer_maps",
    "naflexvit_layer_maps",
    "finalize_one",
]

_POOLINGS = ("mean", "model")


def finalize_one(per_layer: Tensor, size: tuple[int, int]) -> Tensor:
    """``(L, g_h, g_w)`` per-layer maps of one sample → ``(H, W)``: sum, upsample, min-max."""
    summed = per_layer.sum(dim=0)[None, None]
    up = F.interpolate(summed, size=size, mode="bilinear", align_corners=False)[0, 0]
    lo, hi = up.min(), up.max()
    return (up - lo) / (hi - lo) if hi > lo else torch.zeros_like(up)


def _layers(n: int, layers: Optional[Sequence[int]]) -> list[int]:
    return list(range(n)) if layers is None else [int(i) % n for i in layers]


def _mha_pool_by_hand(head: Any, feats: Tensor) -> tuple[Tensor, Tensor]:
    """SigLIP(2)'s attention-pooling head from its weights: ``(pooled, attn (B, h, 1, N))``."""
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
    out = mha.out_proj((attn @ v).transpose(1, 2).reshape(b, 1, d))
    out = out + head.mlp(head.layernorm(out))
    return out[:, 0], attn


# --------------------------------------------------------------------------------------------
# HF SigLIP2
# --------------------------------------------------------------------------------------------


def _siglip2_tower(model: nn.Module) -> Any:
    tower: Any = model
    while not hasattr(tower, "post_layernorm"):
        tower = tower.vision_model
    return tower


def _siglip2_readout(model: nn.Module, z: Tensor, pooling: str) -> tuple[Tensor, Optional[Tensor]]:
    tower = _siglip2_tower(model)
    norm = tower.post_layernorm
    if type(model).__name__ == "Siglip2ForImageClassification":
        m: Any = model
        pooled = norm(z.mean(1)) if pooling == "mean" else norm(z).mean(1)
        return m.classifier(pooled), None
    if getattr(tower, "use_head", False):
        return _mha_pool_by_hand(tower.head, norm(z))
    return (norm(z.mean(1)) if pooling == "mean" else norm(z).mean(1)), None


def siglip2_layer_maps(
    model: nn.Module,
    pixel_values: Tensor,
    spatial_shape: tuple[int, int],
    target: int,
    layers: Optional[Sequence[int]] = None,
    pooling: str = "mean",
    text: Optional[Tensor] = None,
) -> Tensor:
    """Per-layer maps ``(L, h, w)`` of ONE sample given only its ``h·w`` valid patch rows
    ``(h·w, p·p·C)``."""
    assert pooling in _POOLINGS
    h, w = spatial_shape
    assert pixel_values.shape[0] == h * w
    work = copy.deepcopy(model).eval()
    work.set_attn_implementation("eager")
    tower = _siglip2_tower(work)
    x = pixel_values[None].detach().clone()
    mask = torch.ones(1, h * w, dtype=torch.long)
    shapes = torch.tensor([[h, w]])
    maps = []
    with torch.enable_grad():
        out = tower(x, mask, shapes, output_attentions=True, output_hidden_states=True)
        for layer in _layers(len(out.attentions), layers):
            z = out.hidden_states[layer + 1]
            scores, pool_attn = _siglip2_readout(work, z, pooling)
            attn = out.attentions[layer] if pool_attn is None else pool_attn
            assert attn.grad_fn is not None and attn.shape[-1] == h * w
            if text is not None:
                scores = F.normalize(scores, dim=-1) @ F.normalize(text, dim=-1).T
            (grad,) = torch.autograd.grad(scores[0, target], attn, retain_graph=True)
            e = grad[0].clamp(min=0).mean(dim=0).mean(dim=0)  # heads, then query rows
            maps.append(e.reshape(h, w))
    return torch.stack(maps).detach()


# --------------------------------------------------------------------------------------------
# timm NaFlexVit
# --------------------------------------------------------------------------------------------


def _attention_by_hand(attn: Any, x: Tensor) -> tuple[Tensor, Tensor]:
    """timm ``Attention`` written out: ``(output, probabilities (B, h, N, N))``."""
    b, n, c = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    probs = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(b, n, c)
    out = attn.norm(out) if hasattr(attn, "norm") else out
    return attn.proj(out), probs


def _latent_pool_by_hand(pool: Any, x: Tensor) -> tuple[Tensor, Tensor]:
    """timm ``AttentionPoolLatent`` written out (one latent): ``(pooled, attn)``."""
    b, n, c = x.shape
    heads, hd = pool.num_heads, pool.head_dim
    q = pool.q(pool.latent.expand(b, -1, -1)).reshape(b, -1, heads, hd).transpose(1, 2)
    kv = pool.kv(x).reshape(b, n, 2, heads, hd).permute(2, 0, 3, 1, 4)
    k, v = kv.unbind(0)
    q, k = pool.q_norm(q), pool.k_norm(k)
    probs = ((q * pool.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(b, -1, c)
    out = pool.proj(out)
    out = out + pool.mlp(pool.norm(out))
    return out[:, 0], probs


def naflexvit_layer_maps(
    model: nn.Module,
    patches: Tensor,
    coords: Tensor,
    target: int,
    layers: Optional[Sequence[int]] = None,
    pooling: str = "mean",
) -> Tensor:
    """Per-layer maps ``(L, g_h, g_w)`` of ONE sample given only its valid patches
    ``(n, p·p·C)`` and their ``(y, x)`` coordinates ``(n, 2)`` (any order)."""
    assert pooling in _POOLINGS
    m: Any = copy.deepcopy(model).eval()
    n = patches.shape[0]
    valid = torch.ones(1, n, dtype=torch.bool)
    g_h, g_w = int(coords[:, 0].max()) + 1, int(coords[:, 1].max()) + 1
    prefix = int(m.num_prefix_tokens)
    selected = _layers(len(m.blocks), layers)
    maps = []
    with torch.enable_grad():
        x, _ = m.embeds(patches[None], patch_coord=coords[None], patch_valid=valid)
        x = m.norm_pre(x)
        states, probs_all = [], []
        for blk in m.blocks:
            out, probs = _attention_by_hand(blk.attn, blk.norm1(x))
            x = x + blk.ls1(out)
            x = x + blk.ls2(blk.mlp(blk.norm2(x)))
            states.append(x)
            probs_all.append(probs)
        for layer in selected:
            z = states[layer]
            if m.attn_pool is not None:
                pooled, attn = _latent_pool_by_hand(m.attn_pool, m.norm(z)[:, prefix:])
                scores = m.head(m.fc_norm(pooled))
                key_offset = 0
            else:
                attn, key_offset = probs_all[layer], prefix
                if pooling == "mean":
                    scores = m.head(m.fc_norm(m.norm(z.mean(1))))
                else:
                    normed = m.norm(z)
                    pooled = normed[:, prefix:].mean(1) if m.global_pool == "avg" else normed[:, 0]
                    scores = m.head(m.fc_norm(pooled))
            (grad,) = torch.autograd.grad(scores[0, target], attn, retain_graph=True)
            e = grad[0].clamp(min=0).mean(dim=0).mean(dim=0)[key_offset:]
            grid = torch.zeros(g_h, g_w)
            grid[coords[:, 0], coords[:, 1]] = e
            maps.append(grid)
    return torch.stack(maps).detach()
