"""Independent LeGrad oracle for vision-language models' answers, from docs/method.md.

It imports nothing from ``captum_legrad``. A deep copy of the model is switched to eager
attention and run once on the whole teacher-forced sequence with ``output_attentions=True``;
the decoder layers' outputs ``Z^l`` are kept with plain forward hooks on the copy. Then,
in explicit loops over answer tokens ``j`` and layers ``l``:

1. ``s^l_j = sum_b lm_head(norm(Z^l))[b, positions[b, j], answer_ids[b, j]]`` (the final
   norm and the full ``lm_head`` over the whole sequence, then the logit picked out, then
   the model's final-logit soft-capping if it has one);
2. ``G = autograd.grad(s^l_j, A^l)`` with ``A^l`` the attentions HF returns;
3. ReLU, mean over heads and all query rows, the image-token keys, reshaped to the grid.

``finalize`` sums layers, upsamples bilinearly (``align_corners=False``) and min-max
normalises per (sample, token).
"""

from __future__ import annotations

import copy
from typing import Any, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["oracle_answer_maps", "oracle_token_maps", "finalize", "answer_logits"]


def _eager_copy(model: nn.Module) -> Any:
    work: Any = copy.deepcopy(model)
    work.set_attn_implementation("eager")
    return work.eval()


def _forward(work: Any, batch: dict, layers: List[nn.Module]) -> tuple:
    outputs: List[Tensor] = []
    handles = [
        layer.register_forward_hook(
            lambda m, a, o: outputs.append(o[0] if isinstance(o, tuple) else o)
        )
        for layer in layers
    ]
    try:
        with torch.enable_grad():
            out = work(**batch, output_attentions=True, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return out, outputs


def answer_logits(
    model: nn.Module,
    batch: dict,
    positions: Tensor,
    answer_ids: Tensor,
) -> Tensor:
    """The model's own logits of ``answer_ids`` at ``positions``: ``(B, T)``."""
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits
    rows = torch.arange(logits.shape[0]).unsqueeze(1)
    return logits[rows, positions, answer_ids]


def oracle_answer_maps(
    model: nn.Module,
    batch: dict,
    positions: Tensor,
    answer_ids: Tensor,
    image_keys: Tensor,
    grid: tuple,
    layers: Optional[Sequence[int]] = None,
    softcap: Optional[float] = None,
    summed: bool = False,
) -> Tensor:
    """Per-layer, per-token maps ``(B, T, L_sel, g_h, g_w)``, unnormalised.

    ``summed=True``: one "token", the sum of all answer tokens' logits: ``(B, 1, ...)``.

    ``batch``: the model's keyword inputs for the whole sequence (``input_ids`` with the
    answer appended, ``pixel_values``, ``attention_mask``, ``token_type_ids``).
    ``positions`` / ``answer_ids`` ``(B, T)``: where each answer token is predicted and its
    id. ``image_keys`` ``(B, g_h·g_w)``: the key positions of the image patches.
    """
    work = _eager_copy(model)
    language = work.model.language_model
    decoder = list(language.layers)
    out, hidden = _forward(work, batch, decoder)
    attentions = out.attentions
    assert len(attentions) == len(decoder) == len(hidden)
    chosen = range(len(decoder)) if layers is None else [i % len(decoder) for i in layers]
    b, t = answer_ids.shape
    rows = torch.arange(b)
    maps = torch.zeros(b, 1 if summed else t, len(chosen), *grid)
    for j in range(1 if summed else t):
        for slot, layer in enumerate(chosen):
            logits = work.lm_head(language.norm(hidden[layer]))
            tokens = list(range(t)) if summed else [j]
            picked = torch.zeros(b)
            for k in tokens:
                one = logits[rows, positions[:, k], answer_ids[:, k]]
                if softcap is not None:
                    one = torch.tanh(one / softcap) * softcap
                picked = picked + one
            (grad,) = torch.autograd.grad(picked.sum(), attentions[layer], retain_graph=True)
            assert grad.shape[0] == b and grad.dim() == 4
            per_key = grad.clamp(min=0).mean(dim=(1, 2))  # (B, N_k)
            for i in range(b):
                maps[i, j, slot] = per_key[i, image_keys[i]].view(*grid)
    return maps


def oracle_token_maps(
    model: nn.Module,
    batch: dict,
    positions: Tensor,
    answer_ids: Tensor,
    keys: List[Tensor],
    layers: Optional[Sequence[int]] = None,
) -> List[Tensor]:
    """Per sample ``(T, L_sel, n_b)``: the maps at ``keys[b]`` (any number of image and
    video tokens per sample, in the order given), unnormalised."""
    longest = max(int(k.numel()) for k in keys)
    padded = torch.stack(
        [torch.cat([k, k.new_zeros(longest - k.numel())]) for k in keys]
    )  # key 0 fills the gap and is cut below
    maps = oracle_answer_maps(model, batch, positions, answer_ids, padded, (longest,), layers)
    return [maps[b, ..., : int(k.numel())] for b, k in enumerate(keys)]


def finalize(maps: Tensor, size: tuple) -> Tensor:
    """Sum layers, upsample, min-max per (sample, token): ``(B, T, H, W)``."""
    summed = maps.sum(dim=2)
    up = F.interpolate(summed, size=size, mode="bilinear", align_corners=False)
    flat = up.flatten(2)
    low = flat.min(-1, keepdim=True).values
    high = flat.max(-1, keepdim=True).values
    out = torch.where(high > low, (flat - low) / (high - low).clamp_min(1e-30), 0.0)
    return out.view_as(up)
