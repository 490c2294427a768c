"""Independent oracle for Mllama's answer maps (docs/method.md, "Cross-attention VLMs").

Written from the definition only, sharing no code with the package: an eager deep copy of
the model runs once on the whole teacher-forced sequence; forward hooks on every
cross-attention decoder layer keep its output ``Z^l`` and on its attention module keep the
probabilities the eager attention returns (``(B, H, Q, N_v)``, in the graph: the output is
their product with ``V``). For every answer token and layer, ``torch.autograd.grad`` of the
logit lens ``lm_head(norm(Z^l))`` at the predicting position, picked at the answer token,
to those probabilities; ReLU; mean over heads and all query rows. The key vector is cut
``(images, max_num_tiles, 1 + P²)``, the CLS tokens and the tiles past the image's
``r × c`` grid dropped, and each tile's ``P × P`` grid placed at its row-major place on the
``(r·P) × (c·P)`` canvas grid, ``(r, c)`` read from the processor's own enumeration of the
aspect ratios.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Dict, List, Tuple

import torch
from torch import Tensor, nn


def aspect_ratios(max_tiles: int) -> List[Tuple[int, int]]:
    """``(rows, cols)`` of every aspect-ratio id - 1: the processor's enumeration (the first
    loop variable is the tile rows)."""
    return [
        (a, b)
        for a in range(1, max_tiles + 1)
        for b in range(1, max_tiles + 1)
        if a * b <= max_tiles
    ]


def fit_to_canvas(height: int, width: int, canvas: Tuple[int, int], tile: int) -> Tuple[int, int]:
    """The resized content ``(h', w')`` inside the canvas, as the processor computes it
    (its float arithmetic too: ``⌊90 · (28 / 40)⌋`` is 62, not 63)."""
    th = min(max(height, tile), canvas[0])
    tw = min(max(width, tile), canvas[1])
    scale_h, scale_w = th / height, tw / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, th), tw
    return th, min(math.floor(width * scale_h) or 1, tw)


def key_maps(
    model: nn.Module, batch: Dict[str, Tensor], positions: Tensor, answer_ids: Tensor
) -> Tensor:
    """``(B, T, L, N_v)``: per sample, answer token and cross-attention layer, the LeGrad
    value of every vision key (``batch``: the model's own keyword inputs over the whole
    teacher-forced sequence)."""
    work: Any = copy.deepcopy(model)
    work.set_attn_implementation("eager")
    work.eval()
    text = work.model.language_model
    cross = list(work.config.text_config.cross_attention_layers)
    outputs: List[Tensor] = []
    probs: List[Tensor] = []
    handles = []
    for index in cross:
        layer = text.layers[index]
        handles.append(layer.register_forward_hook(lambda m, a, o: outputs.append(o)))
        handles.append(layer.cross_attn.register_forward_hook(lambda m, a, o: probs.append(o[1])))
    try:
        with torch.enable_grad():
            work(**batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    assert len(outputs) == len(probs) == len(cross)
    b, t = answer_ids.shape
    rows = torch.arange(b)
    n = probs[0].shape[-1]
    maps = torch.zeros(b, t, len(cross), n)
    for j in range(t):
        for k in range(len(cross)):
            logits = work.lm_head(text.norm(outputs[k]))
            picked = logits[rows, positions[:, j], answer_ids[:, j]]
            (grad,) = torch.autograd.grad(picked.sum(), probs[k], retain_graph=True)
            maps[:, j, k] = grad.clamp(min=0).mean(dim=(1, 2))
    return maps


def canvas_grid(keys: Tensor, image: int, ratio_id: int, config: Any) -> Tensor:
    """Image ``image``'s keys of one sample's ``(…, N_v)`` values → ``(…, r·P, c·P)``."""
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    tiles = vision.max_num_tiles
    rows, cols = aspect_ratios(tiles)[ratio_id - 1]
    lead = keys.shape[:-1]
    per_image = keys.reshape(*lead, -1, tiles, 1 + side * side)[..., image, :, 1:]
    out = keys.new_zeros(*lead, rows * side, cols * side)
    for tile in range(rows * cols):
        r, c = divmod(tile, cols)
        out[..., r * side : (r + 1) * side, c * side : (c + 1) * side] = per_image[
            ..., tile, :
        ].reshape(*lead, side, side)
    return out
