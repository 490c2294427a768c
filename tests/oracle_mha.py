"""Independent oracle for ``nn.MultiheadAttention`` ViTs (torchvision, OpenCLIP), from
docs/method.md.

It does not use ``captum_legrad``. Attention probabilities are obtained the TorchCAM way:
every hooked ``nn.MultiheadAttention`` is called with ``need_weights=True,
average_attn_weights=False`` (a forward pre-hook), and a forward hook replays its output as
``out_proj(A · V)`` with ``A`` a fresh leaf holding the returned probabilities. The
replayed output equals the original, and since every ``A`` is a leaf, ``∂s^l/∂A^l`` is the
partial derivative docs/method.md asks for, one ``autograd.grad`` per layer.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@contextmanager
def replayed_attention(
    modules: Sequence[nn.MultiheadAttention],
) -> Iterator[Dict[int, List[Tensor]]]:
    """Within the context, each module's probabilities are leaves appended to ``store[i]``."""
    store: Dict[int, List[Tensor]] = {i: [] for i in range(len(modules))}
    handles = []

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> tuple:
        return args, {**kwargs, "need_weights": True, "average_attn_weights": False}

    def post(i: int) -> Callable:
        def hook(module: nn.MultiheadAttention, args: tuple, kwargs: dict, output: tuple) -> tuple:
            value = args[2]
            probs = output[1].detach().requires_grad_()  # (B, H, L, S)
            store[i].append(probs)
            if not module.batch_first:
                value = value.transpose(0, 1)
            e, h = module.embed_dim, module.num_heads
            if module._qkv_same_embed_dim:
                w_v = module.in_proj_weight[2 * e :]
            else:
                w_v = module.v_proj_weight
            b_v = module.in_proj_bias[2 * e :] if module.in_proj_bias is not None else None
            v = F.linear(value, w_v, b_v)  # (B, S, E)
            v = v.view(v.shape[0], v.shape[1], h, e // h).transpose(1, 2)
            out = (probs @ v).transpose(1, 2).reshape(v.shape[0], -1, e)
            out = module.out_proj(out)
            if not module.batch_first:
                out = out.transpose(0, 1)
            return out, output[1]

        return hook

    try:
        for i, module in enumerate(modules):
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(module.register_forward_hook(post(i), with_kwargs=True))
        yield store
    finally:
        for handle in handles:
            handle.remove()


def relevance(grad: Tensor, grid: Tuple[int, int], query: int | None = None) -> Tensor:
    """ReLU, mean over heads and query rows (or one query row), drop prefix keys → grid."""
    e = grad.clamp(min=0)
    e = e[:, :, query] if query is not None else e.mean(dim=2)
    e = e.mean(dim=1)  # heads
    n = grid[0] * grid[1]
    return e[:, e.shape[1] - n :].reshape(-1, *grid)


def finish(per_layer: Tensor, size: Tuple[int, int]) -> Tensor:
    """Sum layers, bilinear upsample, per-sample min-max (zeros for a constant map)."""
    up = F.interpolate(
        per_layer.sum(1, keepdim=True), size=size, mode="bilinear", align_corners=False
    )
    flat = up.flatten(1)
    lo, hi = flat.min(1).values.view(-1, 1, 1, 1), flat.max(1).values.view(-1, 1, 1, 1)
    span = hi - lo
    return torch.where(span > 0, (up - lo) / torch.where(span > 0, span, 1), torch.zeros_like(up))


@contextmanager
def block_outputs(
    blocks: Sequence[nn.Module], layers: Sequence[int]
) -> Iterator[Dict[int, Tensor]]:
    """Within the context, ``store[i]`` is the output of ``blocks[i]`` (last call)."""
    store: Dict[int, Tensor] = {}
    hooks = [
        blocks[i].register_forward_hook(lambda m, a, o, i=i: store.__setitem__(i, o))
        for i in layers
    ]
    try:
        yield store
    finally:
        for h in hooks:
            h.remove()


def block_attention_maps(
    run: Callable[[], object],
    blocks: Sequence[nn.Module],
    attentions: Sequence[nn.MultiheadAttention],
    score: Callable[[Tensor], Tensor],
    layers: Sequence[int],
    grid: Tuple[int, int],
    batch_first: bool = True,
) -> Tensor:
    """Per-layer maps (B, L, g_h, g_w) for self-attention LeGrad; ``score(Z) → (B,)``."""
    maps = []
    with (
        torch.enable_grad(),
        block_outputs(blocks, layers) as outputs,
        replayed_attention([attentions[i] for i in layers]) as store,
    ):
        run()
        for slot, i in enumerate(layers):
            z = outputs[i] if batch_first else outputs[i].transpose(0, 1)
            (g,) = torch.autograd.grad(score(z).sum(), store[slot][0], retain_graph=True)
            maps.append(relevance(g, grid))
    return torch.stack(maps, 1)


def pool_attention_maps(
    run: Callable[[], object],
    blocks: Sequence[nn.Module],
    pool_mha: nn.MultiheadAttention,
    score: Callable[[Tensor], Tensor],
    layers: Sequence[int],
    grid: Tuple[int, int],
    query: int | None,
    batch_first: bool = True,
) -> Tensor:
    """Per-layer maps for attention-pool readouts: the pooler's attention on each Z^l."""
    with torch.no_grad(), block_outputs(blocks, layers) as outputs:
        run()
    maps = []
    with torch.enable_grad(), replayed_attention([pool_mha]) as store:
        for i in layers:
            z = outputs[i] if batch_first else outputs[i].transpose(0, 1)
            s = score(z.detach().requires_grad_()).sum()
            (g,) = torch.autograd.grad(s, store[0][-1])
            maps.append(relevance(g, grid, query))
    return torch.stack(maps, 1)
