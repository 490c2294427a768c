"""Independent test oracle for LeGrad on the timm families beyond ``VisionTransformer``:
Beit, VisionTransformerRelPos, CaiT, ConViT, XCiT, SAM and the VLM vision towers.

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
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FAMILY_READOUTS", "timm_oracle_layer_maps", "timm_oracle_legrad"]

Readout = Callable[[nn.Module, Tensor, int], Tensor]  # (work, Z^l, block index) -> logits


def _blocks(work: nn.Module, family: str) -> list[nn.Module]:
    if family == "cait":
        return list(work.blocks) + list(work.blocks_token_only)
    if family == "xcit":
        return list(work.cls_attn_blocks)
    if family == "sam":
        return [b for b in work.blocks if b.window_size == 0]
    if family in ("qwen3", "gemma4", "deepseek"):
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
    a_by: dict[int, Tensor] = {}
    handles = []
    for i in ids:
        handles.append(
            blocks[i].register_forward_hook(lambda m, a, out, i=i: z_by.__setitem__(i, out))
        )
        handles.append(
            blocks[i].attn.attn_drop.register_forward_hook(
                lambda m, a, out, i=i: a_by.__setitem__(i, out)
            )
        )
    maps = []
    try:
        with torch.enable_grad():
            work(x.detach().clone().requires_grad_(True))
            for i in ids:
                logits = readout(work, z_by[i], pooling)
                score = logits.gather(1, target.view(-1, 1)).sum()
                (grad,) = torch.autograd.grad(score, a_by[i], retain_graph=True)
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
