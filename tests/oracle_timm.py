"""Independent test oracle for LeGrad on the timm families beyond ``VisionTransformer``:
Beit, VisionTransformerRelPos, CaiT, ConViT, XCiT, SAM and the VLM vision towers, and the
``VisionTransformer`` blocks with parallel attentions (``ParallelThingsBlock``) or
differential attention (``DiffAttention``, ``DiffParallelScalingBlock``).

Written from docs/method.md and the readouts docs/models.md defines per family; imports
nothing from ``captum_legrad``. A deep copy of the model runs with eager attention
(``fused_attn = False`` everywhere, eval mode); forward hooks keep each selected block's
output ``Z^l`` and its attention ``A^l``: the output of the block's ``attn.attn_drop``, i.e.
the tensor multiplied with ``V`` (for CaiT's talking heads the head mix after the softmax,
for ConViT's GPSA the gated, renormalised mix). Then, one layer at a time on the full
graph (no block input is cut), ``G^l = d s^l / d A^l`` with ``s^l = sum_b
readout_l(Z^l)[b, target_b]``, ReLU, mean over heads and query rows, the leading
non-patch keys dropped, reshaped to the grid; the final map sums the layers, upsamples
bilinearly and min-max normalises.

Parallel attentions (docs/method.md): a block's branches are head groups of one attention,
so ``A^l`` is every branch's ``attn_drop`` output, concatenated along the heads, and the mean
runs over all their heads. Differential attention: ``A^l`` is the differential matrix
``softmax(Q1 K1ᵀ s) − λ·softmax(Q2 K2ᵀ s)``, which timm never holds as one tensor in its
fused path and forms inline in its eager one; the copy's attention forwards are replaced
by :func:`_diff_attention` / :func:`_diff_parallel_block`, written from timm's math with
``A`` explicit and kept (the copy's output is checked against the model's).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FAMILY_READOUTS", "timm_oracle_layer_maps", "timm_oracle_legrad"]

Readout = Callable[[nn.Module, Tensor, int], Tensor]  # (work, Z^l, block index) -> logits


def _diff_core(module: nn.Module, q: Tensor, k: Tensor, v: Tensor, keep: list[Tensor]) -> Tensor:
    """Differential attention with ``A`` explicit: ``(B, H, N, 2d)`` output before the
    head merge (sub_norm, ``1 − λ_init`` scale)."""
    batch, n = q.shape[0], q.shape[1]
    heads, d = module.num_heads, module.head_dim
    q = module.q_norm(q.reshape(batch, n, 2 * heads, d).transpose(1, 2))
    k = module.k_norm(k.reshape(batch, n, 2 * heads, d).transpose(1, 2))
    v = v.reshape(batch, n, heads, 2 * d).transpose(1, 2)
    lam = module._compute_lambda().type_as(q)
    p = torch.softmax((q * d**-0.5) @ k.transpose(-2, -1), dim=-1).view(batch, heads, 2, n, n)
    a = p[:, :, 0] - lam * p[:, :, 1]  # the differential matrix, (B, H, N, N)
    keep.append(a)
    out = module.sub_norm(a @ v) * (1 - module.lambda_init)
    return out.transpose(1, 2).reshape(batch, n, -1)


def _diff_attention(module: nn.Module, keep: list[Tensor]) -> Callable[..., Tensor]:
    def forward(x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        q, k, v = module.qkv(x).chunk(3, dim=2)
        return module.proj_drop(module.proj(module.norm(_diff_core(module, q, k, v, keep))))

    return forward


def _diff_parallel_block(module: nn.Module, keep: list[Tensor]) -> Callable[..., Tensor]:
    def forward(x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        y = module.in_proj(module.in_norm(x))
        x_mlp, q, k, v = torch.split(y, module.in_split, dim=-1)
        if module.mlp_bias is not None:
            x_mlp = x_mlp + module.mlp_bias
        x_attn = _diff_core(module, q, k, v, keep)
        y = module.out_proj(torch.cat((x_attn, module.mlp_drop(module.mlp_act(x_mlp))), dim=-1))
        return x + module.drop_path(module.ls(y))

    return forward


def _attention_sources(block: nn.Module, keep: list[Tensor]) -> list[Any]:
    """Hook handles (or forwards replaced) that append block's ``A^l`` tensors to ``keep``."""
    names = {type(m).__name__: m for m in block.modules()}
    if type(block).__name__ == "DiffParallelScalingBlock":
        block.forward = _diff_parallel_block(block, keep)  # the deep copy only
        return []
    if "DiffAttention" in names:
        attn = names["DiffAttention"]
        attn.forward = _diff_attention(attn, keep)
        return []
    if type(block).__name__ == "ParallelThingsBlock":  # every branch: head groups
        drops = [branch.attn.attn_drop for branch in block.attns]
    else:
        drops = [block.attn.attn_drop]
    return [d.register_forward_hook(lambda m, a, out: keep.append(out)) for d in drops]


def _blocks(work: nn.Module, family: str) -> list[nn.Module]:
    if family == "cait":
        return list(work.blocks) + list(work.blocks_token_only)
    if family == "xcit":
        return list(work.cls_attn_blocks)
    if family == "sam":
        return [b for b in work.blocks if b.window_size == 0]
    if family in ("qwen3", "gemma4", "gemma4_soft", "deepseek"):
        return list(work.encoder.blocks)
    return list(work.blocks)


def _plain(work: nn.Module, z: Tensor, pooling: str) -> Tensor:
    """Beit / VisionTransformerRelPos: head(fc_norm(norm(mean Z))) or forward_head(norm(Z))."""
    if pooling == "mean":
        return work.head(work.head_drop(work.fc_norm(work.norm(z.mean(dim=1)))))
    return work.forward_head(work.norm(z))


def _cait(work: nn.Module, z: Tensor, pooling: str) -> Tensor:
    if z.shape[1] == 1:  # class-attention block: Z is the class token
        return work.head(work.norm(z[:, 0]))
    if pooling == "mean":
        return work.head(work.norm(z.mean(dim=1)))
    cls = work.cls_token.expand(z.shape[0], -1, -1)
    for blk in work.blocks_token_only:
        cls = blk(z, cls)
    return work.head(work.norm(torch.cat((cls, z), dim=1))[:, 0])


def _convit(work: nn.Module, z: Tensor, pooling: str) -> Tensor:
    if pooling == "mean":
        return work.head(work.norm(z.mean(dim=1)))
    if z.shape[1] == work.patch_embed.num_patches:  # class token not there yet
        return work.head(work.norm(z).mean(dim=1))
    return work.head(work.norm(z)[:, 0])


def _xcit(work: nn.Module, z: Tensor, pooling: str) -> Tensor:
    if pooling == "mean":
        return work.head(work.norm(z.mean(dim=1)))
    return work.head(work.norm(z)[:, 0])


def _sam(work: nn.Module, z: Tensor, pooling: str) -> Tensor:
    return work.head(work.neck(z.permute(0, 3, 1, 2)))


def _grid_side(z: Tensor) -> int:
    side = round(z.shape[1] ** 0.5)
    assert side * side == z.shape[1]
    return side


def _qwen3(work: nn.Module, z: Tensor, pooling: str) -> Tensor:
    merger = work.encoder.merger
    if merger is not None:
        side = _grid_side(z)
        z = merger(z.reshape(z.shape[0], side, side, -1))
    return work.head(work.norm(z.mean(dim=1)))


def _deepseek(work: nn.Module, z: Tensor, pooling: str) -> Tensor:
    z = work.encoder.norm(z)
    aligner = work.encoder.aligner
    if aligner is not None:
        side = _grid_side(z)
        z = aligner(z.reshape(z.shape[0], side, side, -1))
    return work.head(work.norm(z.mean(dim=1)))


def _gemma4(work: nn.Module, z: Tensor, pooling: str) -> Tensor:
    return work.head(work.norm(z.mean(dim=1)))


def _gemma4_soft(work: nn.Module, z: Tensor, pooling: str) -> Tensor:
    """encoder_pool="soft": mean over each k x k cell of the square grid, times sqrt(D),
    standardised where the encoder is, then the classifier's mean over the cells."""
    encoder, k = work.encoder, work.encoder.pooler.pooling_kernel_size
    side, dim = _grid_side(z), z.shape[-1]
    cells = z.reshape(z.shape[0], side // k, k, side // k, k, dim).mean(dim=(2, 4))
    cells = cells.reshape(z.shape[0], -1, dim) * dim**0.5
    if encoder.std_bias is not None:
        cells = (cells - encoder.std_bias) * encoder.std_scale
    return work.head(work.norm(cells.mean(dim=1)))


FAMILY_READOUTS: dict[str, Callable[[nn.Module, Tensor, str], Tensor]] = {
    "beit": _plain,
    "relpos": _plain,
    "cait": _cait,
    "convit": _convit,
    "xcit": _xcit,
    "sam": _sam,
    "qwen3": _qwen3,
    "deepseek": _deepseek,
    "gemma4": _gemma4,
    "gemma4_soft": _gemma4_soft,
    "parallel": _plain,
    "diff": _plain,
}


def timm_oracle_layer_maps(
    model: nn.Module,
    family: str,
    x: Tensor,
    target: Tensor,
    patch: int,
    layers: Sequence[int] | None = None,
    pooling: str = "mean",
) -> Tensor:
    """Per-layer maps ``(B, n_layers, g_h, g_w)``, unnormalised, one autograd.grad per layer."""
    work = copy.deepcopy(model).eval()
    for module in work.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    blocks = _blocks(work, family)
    ids = list(range(len(blocks))) if layers is None else [i % len(blocks) for i in layers]
    readout = FAMILY_READOUTS[family]
    g_h, g_w = x.shape[-2] // patch, x.shape[-1] // patch
    target = torch.as_tensor(target).reshape(-1)
    z_by: dict[int, Tensor] = {}
    a_by: dict[int, list[Tensor]] = {i: [] for i in ids}
    handles = []
    for i in ids:
        handles.append(
            blocks[i].register_forward_hook(lambda m, a, out, i=i: z_by.__setitem__(i, out))
        )
        handles += _attention_sources(blocks[i], a_by[i])
    maps = []
    try:
        with torch.enable_grad():
            out = work(x.detach().clone().requires_grad_(True))
            for handle in handles:  # the forward's own Z^l, A^l (readouts may run blocks)
                handle.remove()
            a_by = {i: list(a_by[i]) for i in ids}
            with torch.no_grad():  # the oracle's own attention forwards compute the model
                torch.testing.assert_close(out, model.eval()(x), rtol=1e-4, atol=1e-5)
            for i in ids:
                logits = readout(work, z_by[i], pooling)
                score = logits.gather(1, target.view(-1, 1)).sum()
                grads = torch.autograd.grad(score, a_by[i], retain_graph=True)
                grad = torch.cat(grads, dim=-3)  # head groups of one attention: all heads
                if grad.dim() == 3:  # (B·heads, N_q, N_k): SAM folds the heads into the batch
                    grad = grad.reshape(x.shape[0], -1, *grad.shape[-2:])
                e = grad.clamp(min=0).mean(dim=1).mean(dim=1)  # heads, then queries
                maps.append(e[:, e.shape[1] - g_h * g_w :].reshape(-1, g_h, g_w))
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(maps, dim=1)


def timm_oracle_legrad(
    model: nn.Module,
    family: str,
    x: Tensor,
    target: Tensor,
    patch: int,
    layers: Sequence[int] | None = None,
    pooling: str = "mean",
) -> Tensor:
    """Final map ``(B, 1, H, W)``: sum over layers, bilinear upsample, per-sample min-max."""
    summed = timm_oracle_layer_maps(model, family, x, target, patch, layers, pooling).sum(
        dim=1, keepdim=True
    )
    up = F.interpolate(summed, size=x.shape[-2:], mode="bilinear", align_corners=False)
    out = torch.zeros_like(up)
    for b in range(up.shape[0]):
        lo, hi = up[b].min(), up[b].max()
        if hi > lo:
            out[b] = (up[b] - lo) / (hi - lo)
    return out
