"""Independent test oracle for LeGrad, written only from docs/method.md (arXiv 2404.03214).

This module is a plain, deliberately slow reference implementation of LeGrad for timm
``VisionTransformer`` and ``Eva`` models. It does not import or read anything from the
``captum_legrad`` package, so tests can compare two independent implementations.

Method (per selected layer ``l``):

1. Run a deep copy of the model (non-fused attention, eval mode) and capture, with forward
   hooks, the post-softmax attention probabilities ``A^l`` (output of ``blk.attn.attn_drop``,
   shape ``(B, H, N, N)``) and the block output ``Z^l`` (shape ``(B, N, D)``).
2. Score ``s^l = sum_b readout(Z^l)[b, target_b]`` with
   - ``pooling="mean"``:  ``head(fc_norm(norm(Z.mean(dim=1))))`` (mean over all tokens),
   - ``pooling="model"``: ``forward_head(norm(Z))`` (the model's own pooling).
   For attention-pool models (``model.attn_pool`` is an ``AttentionPoolLatent``) both poolings
   use ``head(fc_norm(attn_pool(norm(Z))))`` and the differentiated attention is the pooler's
   own attention ``A_pool`` computed on ``Z^l`` (re-implemented by hand below).
3. ``G^l = d s^l / d A^l`` with one ``torch.autograd.grad`` call per layer.
4. ``E^l = relu(G^l)`` averaged over heads and all query rows -> ``(B, N_k)``; the leading
   prefix key columns are dropped and the rest reshaped to the patch grid ``(g_h, g_w)``.
5. Final map: sum over layers, bilinear upsample (``align_corners=False``), per-sample min-max
   to ``[0, 1]`` (all zeros where ``max == min``, no epsilon).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["oracle_layer_maps", "oracle_legrad"]

_POOLINGS = ("mean", "model")
_Hook = Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]


# --------------------------------------------------------------------------------------------
# Model preparation and capture
# --------------------------------------------------------------------------------------------


def _prepare_copy(model: nn.Module) -> nn.Module:
    """Deep copy ``model``, switch every attention module to the explicit (non-fused) path."""
    work = copy.deepcopy(model)
    for module in work.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    work.eval()
    return work


def _resolve_layers(num_blocks: int, layers: Sequence[int] | None) -> list[int]:
    """Turn ``layers`` (None = all, negative allowed) into non-negative block indices."""
    if layers is None:
        return list(range(num_blocks))
    resolved: list[int] = []
    for idx in layers:
        i = int(idx)
        if i < -num_blocks or i >= num_blocks:
            raise IndexError(f"layer index {i} out of range for {num_blocks} blocks")
        resolved.append(i % num_blocks)
    if not resolved:
        raise ValueError("layers must select at least one block")
    return resolved


def _patch_grid(model: nn.Module, x: Tensor) -> tuple[int, int]:
    """Patch grid ``(g_h, g_w)`` for input ``x`` of shape ``(B, C, H, W)``."""
    patch = model.patch_embed.patch_size
    if isinstance(patch, int):
        ph, pw = patch, patch
    else:
        ph, pw = int(patch[0]), int(patch[1])
    return x.shape[-2] // ph, x.shape[-1] // pw


def _run_and_capture(
    work: nn.Module, x: Tensor, layer_ids: Sequence[int], capture_attn: bool
) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """Forward ``work`` on ``x`` and return ``(attn_by_layer, z_by_layer)`` for ``layer_ids``."""
    attn_by_layer: dict[int, Tensor] = {}
    z_by_layer: dict[int, Tensor] = {}
    handles = []
    wanted = set(layer_ids)

    def make_attn_hook(i: int) -> _Hook:
        def hook(_mod: nn.Module, _inp: tuple[Tensor, ...], out: Tensor) -> None:
            attn_by_layer[i] = out

        return hook

    def make_block_hook(i: int) -> _Hook:
        def hook(_mod: nn.Module, _inp: tuple[Tensor, ...], out: Tensor) -> None:
            z_by_layer[i] = out

        return hook

    try:
        for i, blk in enumerate(work.blocks):
            if i not in wanted:
                continue
            handles.append(blk.register_forward_hook(make_block_hook(i)))
            if capture_attn:
                handles.append(blk.attn.attn_drop.register_forward_hook(make_attn_hook(i)))
        work(x)
    finally:
        for h in handles:
            h.remove()

    for i in layer_ids:
        if i not in z_by_layer:
            raise RuntimeError(f"block {i} output was not captured")
        if capture_attn and i not in attn_by_layer:
            raise RuntimeError(f"block {i} attention was not captured (fused attention?)")
    return attn_by_layer, z_by_layer


# --------------------------------------------------------------------------------------------
# Readouts
# --------------------------------------------------------------------------------------------


def _readout_mean(work: nn.Module, z: Tensor) -> Tensor:
    """``head(fc_norm(norm(Z.mean(dim=1))))`` -- mean over all N tokens, prefix included."""
    pooled = z.mean(dim=1)
    return work.head(work.head_drop(work.fc_norm(work.norm(pooled))))


def _readout_model(work: nn.Module, z: Tensor) -> Tensor:
    """``forward_head(norm(Z))`` -- the model's own pooling."""
    return work.forward_head(work.norm(z))


def _select_score(logits: Tensor, target: Tensor) -> Tensor:
    """``sum_b logits[b, target_b]``."""
    picked = logits.gather(1, target.view(-1, 1).to(logits.device))
    return picked.sum()


def _pooler_drops_prefix(work: nn.Module) -> bool:
    """Whether the model's ``pool`` strips prefix tokens before its attention pooler.

    timm ``VisionTransformer.pool`` drops them unless ``pool_include_prefix`` is True;
    timm ``Eva.pool`` has no such attribute and feeds all tokens to the pooler.
    """
    if hasattr(work, "pool_include_prefix"):
        return not bool(work.pool_include_prefix)
    return False


def _attention_pool_by_hand(pool: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Re-implement timm ``AttentionPoolLatent.forward`` from its submodules.

    Returns ``(output, attn)`` where ``attn`` of shape ``(B, heads, latent_len, N)`` is the
    post-softmax probability tensor multiplied with ``v``.
    """
    b, n, c = x.shape
    if pool.pos_embed is not None:
        x = x + pool.pos_embed.unsqueeze(0).to(x.dtype)

    q_latent = pool.latent.expand(b, -1, -1)
    q = pool.q(q_latent).reshape(b, pool.latent_len, pool.num_heads, pool.head_dim)
    q = q.transpose(1, 2)  # (B, heads, L, hd)

    kv = pool.kv(x).reshape(b, n, 2, pool.num_heads, pool.head_dim).permute(2, 0, 3, 1, 4)
    k, v = kv[0], kv[1]  # each (B, heads, N, hd)

    q = pool.q_norm(q)
    k = pool.k_norm(k)

    q = q * pool.scale
    logits = q @ k.transpose(-2, -1)  # (B, heads, L, N)
    attn = torch.softmax(logits, dim=-1)
    out = attn @ v  # (B, heads, L, hd)

    out = out.transpose(1, 2).reshape(b, pool.latent_len, c)
    out = pool.proj(out)
    out = pool.proj_drop(out)
    if pool.mlp is not None:
        out = out + pool.mlp(pool.norm(out))

    if pool.pool == "token":
        out = out[:, 0]
    elif pool.pool == "avg":
        out = out.mean(dim=1)
    return out, attn


def _attn_pool_readout(work: nn.Module, z: Tensor) -> tuple[Tensor, Tensor]:
    """Attention-pool readout ``head(fc_norm(attn_pool(norm(Z))))`` and the pooler's attention."""
    feats = work.norm(z)
    if _pooler_drops_prefix(work):
        feats = feats[:, work.num_prefix_tokens :]
    pooled, attn = _attention_pool_by_hand(work.attn_pool, feats)
    logits = work.head(work.head_drop(work.fc_norm(pooled)))
    return logits, attn


def _is_attention_pool_model(work: nn.Module) -> bool:
    pool = getattr(work, "attn_pool", None)
    if pool is None:
        return False
    if type(pool).__name__ != "AttentionPoolLatent":
        raise NotImplementedError(
            f"oracle only supports AttentionPoolLatent poolers, got {type(pool).__name__}"
        )
    return True


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _relevance_to_grid(grad: Tensor, g_h: int, g_w: int) -> Tensor:
    """relu, mean over heads and query rows, drop leading prefix keys, reshape to the grid."""
    e = grad.clamp(min=0)  # relu
    e = e.mean(dim=1)  # heads -> (B, Nq, Nk)
    e = e.mean(dim=1)  # query rows -> (B, Nk)
    n_patches = g_h * g_w
    n_prefix = e.shape[1] - n_patches
    if n_prefix < 0:
        raise AssertionError(f"fewer keys ({e.shape[1]}) than patches ({n_patches})")
    e = e[:, n_prefix:]
    assert e.shape[1] == g_h * g_w
    return e.reshape(e.shape[0], g_h, g_w)


def oracle_layer_maps(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    layers: Sequence[int] | None = None,
    pooling: str = "mean",
    project: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Per-layer LeGrad maps E^l before aggregation, unnormalised: shape (B, n_layers, g_h, g_w).

    target: LongTensor (B,) of class indices (one per sample).
    project: optional map from the readout (B, D) to the scores (B, K) (a feature model's
    embedding to cosines or projections); the target indexes its columns.
    """
    if pooling not in _POOLINGS:
        raise ValueError(f"pooling must be one of {_POOLINGS}, got {pooling!r}")
    target = torch.as_tensor(target, dtype=torch.long).reshape(-1)
    if target.shape[0] != x.shape[0]:
        raise ValueError("target must hold one class index per sample")

    work = _prepare_copy(model)
    layer_ids = _resolve_layers(len(work.blocks), layers)
    g_h, g_w = _patch_grid(work, x)
    attn_pool_model = _is_attention_pool_model(work)

    # A leaf input that requires grad guarantees a graph even if the parameters are frozen.
    x_in = x.detach().clone().requires_grad_(True)

    maps: list[Tensor] = []
    with torch.enable_grad():
        attn_by_layer, z_by_layer = _run_and_capture(
            work, x_in, layer_ids, capture_attn=not attn_pool_model
        )
        for i in layer_ids:
            z = z_by_layer[i]
            if attn_pool_model:
                logits, attn = _attn_pool_readout(work, z)
            else:
                attn = attn_by_layer[i]
                if pooling == "mean":
                    logits = _readout_mean(work, z)
                else:
                    logits = _readout_model(work, z)
            if project is not None:
                logits = project(logits)
            score = _select_score(logits, target)
            (grad,) = torch.autograd.grad(score, attn, retain_graph=True)
            maps.append(_relevance_to_grid(grad.detach(), g_h, g_w))

    return torch.stack(maps, dim=1)


def oracle_legrad(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    layers: Sequence[int] | None = None,
    pooling: str = "mean",
    output_size: tuple[int, int] | None = None,
    project: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Final LeGrad map (B, 1, H, W).

    Sum over the selected layers of E^l, bilinear upsample (align_corners=False) to x's HxW (or
    ``output_size``), then per-sample min-max to [0, 1] with all zeros where max == min.
    """
    per_layer = oracle_layer_maps(model, x, target, layers=layers, pooling=pooling, project=project)
    summed = per_layer.sum(dim=1, keepdim=True)  # (B, 1, g_h, g_w)
    size = (int(x.shape[-2]), int(x.shape[-1])) if output_size is None else tuple(output_size)
    up = F.interpolate(summed, size=size, mode="bilinear", align_corners=False)

    out = torch.zeros_like(up)
    for b in range(up.shape[0]):
        m = up[b]
        lo = m.min()
        hi = m.max()
        if hi > lo:
            out[b] = (m - lo) / (hi - lo)
    return out
