"""Independent LeGrad oracle for InternVL, Gemma 4 and Llama 4 answers (docs/method.md).

It imports nothing from ``captum_legrad``. A deep copy of the model is switched to eager
attention and run once on the whole teacher-forced sequence with ``output_attentions=True``;
the decoder layers' outputs ``Z^l`` are kept with forward hooks. Then, in explicit loops
over answer tokens ``j`` and layers ``l``:

1. ``s^l_j = sum_b softcap(lm_head(norm(Z^l))[b, positions[b, j], answer_ids[b, j]])``;
2. ``G = autograd.grad(s^l_j, A^l)`` with ``A^l`` the attentions HF returns;
3. ReLU, mean over heads and all query rows: one value per key.

:func:`per_key` returns those values ``(B, T, L, N)``; :func:`on_views` lays a sample's
values out on its views' grids (positions given by hand in the tests).
"""

from __future__ import annotations

import copy
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["language_parts", "per_key", "logits_at", "on_grid"]


def language_parts(model: Any) -> Tuple[List[nn.Module], nn.Module, nn.Module]:
    """(decoder layers, final norm, lm_head) of the three families, read by hand."""
    name = type(model).__name__
    if name == "Llama4ForConditionalGeneration":
        text = model.language_model
        return list(text.model.layers), text.model.norm, text.lm_head
    language = model.model.language_model
    return list(language.layers), language.norm, model.lm_head


def logits_at(model: nn.Module, batch: dict, positions: Tensor, answer_ids: Tensor) -> Tensor:
    """The model's own logits of ``answer_ids`` at ``positions``: ``(B, T)``."""
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits
    rows = torch.arange(logits.shape[0]).unsqueeze(1)
    return logits[rows, positions, answer_ids]


def per_key(
    model: nn.Module,
    batch: dict,
    positions: Tensor,
    answer_ids: Tensor,
    layers: Optional[Sequence[int]] = None,
    softcap: Optional[float] = None,
) -> Tensor:
    """``(B, T, L_sel, N)``: mean over heads and query rows of ``ReLU(∂s^l_j/∂A^l)``."""
    work: Any = copy.deepcopy(model)
    work.set_attn_implementation("eager")
    work.eval()
    decoder, norm, head = language_parts(work)
    hidden: List[Tensor] = []
    handles = [
        layer.register_forward_hook(
            lambda m, a, o: hidden.append(o[0] if isinstance(o, tuple) else o)
        )
        for layer in decoder
    ]
    try:
        with torch.enable_grad():
            out = work(**batch, output_attentions=True, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    attentions = out.attentions
    assert len(attentions) == len(decoder) == len(hidden)
    chosen = range(len(decoder)) if layers is None else [i % len(decoder) for i in layers]
    b, t = answer_ids.shape
    rows = torch.arange(b)
    n = attentions[0].shape[-1]
    maps = torch.zeros(b, t, len(chosen), n)
    for j in range(t):
        for slot, layer in enumerate(chosen):
            logits = head(norm(hidden[layer]))
            one = logits[rows, positions[:, j], answer_ids[:, j]]
            if softcap is not None:
                one = torch.tanh(one / softcap) * softcap
            (grad,) = torch.autograd.grad(one.sum(), attentions[layer], retain_graph=True)
            assert grad.shape[0] == b and grad.dim() == 4
            maps[:, j, slot] = grad.clamp(min=0).mean(dim=(1, 2))
    return maps


def on_grid(values: Tensor, positions: Sequence[int], grid: Tuple[int, int]) -> Tensor:
    """``values (..., N)`` at ``positions`` (row-major cells) → ``(..., g_h, g_w)``."""
    index = torch.tensor(list(positions), dtype=torch.long)
    return values[..., index].reshape(*values.shape[:-1], *grid)
