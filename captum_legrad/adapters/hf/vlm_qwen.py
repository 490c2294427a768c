"""Qwen-VL (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE): where each image's tokens are.

The image processor resizes each image to a multiple of ``patch × merge`` pixels (dynamic
resolution) and flattens it into ``grid_t · grid_h · grid_w`` patches of ``C ·
temporal_patch · patch²`` values, every image and video of the batch one after the other
(``pixel_values`` ``(N, D)``: dimension 0 is not the batch). The vision tower merges each
``merge × merge`` block of patches into one token, so image ``i`` (``image_grid_thw[i] =
(1, h, w)``) fills ``h/merge · w/merge`` consecutive ``<|image_pad|>`` positions of its
prompt, row-major, and a video (``video_grid_thw[i] = (t, h, w)``) ``t · h/merge · w/merge``
``<|video_pad|>`` positions (Qwen3-VL puts a timestamp between temporal groups: the
positions are then not consecutive, the order is). Each image or video is one view of the
whole processed image: the processor returns no original size, so the canvas is the
resized image (``h · patch × w · patch`` pixels; a video ``t · temporal_patch`` frames).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Tuple

import torch
from torch import Tensor

from ...views import SampleViews, Source, View, ViewRules

__all__ = ["QWEN_VL", "CLASSES", "qwen_rules", "rules", "token_step"]

#: The Qwen-VL classes whose language model is a decoder of softmax attention layers.
QWEN_VL = (
    "Qwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration",
    "Qwen3VLForConditionalGeneration",
    "Qwen3VLMoeForConditionalGeneration",
)


def _ints(value: Any) -> Tuple[int, ...]:
    if isinstance(value, (tuple, list)):
        return tuple(int(v) for v in value)
    return (int(value),)


def qwen_rules(config: Any) -> ViewRules:
    """The :class:`~captum_legrad.views.ViewRules` of a Qwen-VL model's ``config``."""
    vision = config.vision_config
    merge = int(vision.spatial_merge_size)
    patch = _ints(vision.patch_size)[0]
    temporal = _ints(vision.temporal_patch_size)[0]
    tokens = {"image": int(config.image_token_id), "video": int(config.video_token_id)}

    def describe(ids: Tensor, mask: Tensor, inputs: Mapping[str, Any]) -> List[SampleViews]:
        rows: Dict[str, List[List[int]]] = {}
        for kind in tokens:
            thw = inputs.get(f"{kind}_grid_thw")
            rows[kind] = [] if thw is None else torch.as_tensor(thw).view(-1, 3).tolist()
        for kind, name in (("image", "pixel_values"), ("video", "pixel_values_videos")):
            pixels = inputs.get(name)
            expected = sum(t * h * w for t, h, w in rows[kind])
            if isinstance(pixels, Tensor) and pixels.dim() == 2 and pixels.shape[0] != expected:
                raise ValueError(
                    f"{name} has {pixels.shape[0]} rows but {kind}_grid_thw describes "
                    f"{expected} patches: Qwen-VL's {name} are the flattened patches of every "
                    f"{kind} (dimension 0 is not the batch), as the processor returns them. "
                    "Captum tools that repeat dimension 0 (NoiseTunnel) do not apply to them."
                )
        used = {kind: 0 for kind in tokens}
        samples = []
        for b in range(ids.shape[0]):
            row, valid = ids[b].cpu(), mask[b].cpu() != 0
            visual = ((row == tokens["image"]) | (row == tokens["video"])) & valid
            where = torch.nonzero(visual)[:, 0]
            sources: List[Source] = []
            views: List[View] = []
            start = 0
            while start < where.numel():
                kind = "image" if int(row[where[start]]) == tokens["image"] else "video"
                if used[kind] >= len(rows[kind]):
                    raise ValueError(
                        f"The prompts hold more {kind}s than {kind}_grid_thw has rows "
                        f"({len(rows[kind])}): pass the processor's {kind}_grid_thw, one row "
                        f"per {kind} in prompt order."
                    )
                t, h, w = rows[kind][used[kind]]
                used[kind] += 1
                n = t * h * w // (merge * merge)
                chunk = where[start : start + n]
                if chunk.numel() != n or bool((row[chunk] != tokens[kind]).any()):
                    raise ValueError(
                        f"{kind} {used[kind] - 1} of the batch has grid {(t, h, w)}, {n} "
                        f"tokens, but sample {b}'s prompt does not hold them: build input_ids "
                        "and the grids with the model's processor, one grid row per image."
                    )
                start += n
                height, width = h * patch, w * patch
                if kind == "image":
                    if t != 1:
                        raise ValueError(f"An image's grid_t must be 1, got {(t, h, w)}.")
                    grid: Tuple[int, ...] = (h // merge, w // merge)
                    sources.append(Source("image", (height, width)))
                    frames = None
                else:
                    grid = (t, h // merge, w // merge)
                    sources.append(Source("video", (t * temporal, height, width)))
                    frames = (0, t * temporal)
                box = (0, 0, height, width)
                views.append(View(chunk, grid, len(sources) - 1, box, frames, kind))
            samples.append(SampleViews(tuple(sources), tuple(views)))
        for kind, count in used.items():
            if count != len(rows[kind]):
                raise ValueError(
                    f"{kind}_grid_thw has {len(rows[kind])} rows but the prompts hold "
                    f"{count} {kind}s: give one row per {kind} of these prompts."
                )
        return samples

    def main_input(inputs: Mapping[str, Any]) -> str:
        if inputs.get("image_grid_thw") is not None:
            return "pixel_values"
        if inputs.get("video_grid_thw") is not None:
            return "pixel_values_videos"
        raise ValueError(
            "Qwen-VL's answer maps need image_grid_thw (images) or video_grid_thw (videos): "
            "pass the processor's outputs to AnswerLogits by their names."
        )

    def build(ids: Tensor) -> Dict[str, Tensor]:
        types = (ids == tokens["image"]).long() + 2 * (ids == tokens["video"]).long()
        return {"mm_token_type_ids": types}

    def to_input(canvases: List[List[Tensor]], name: str, inputs: Mapping[str, Any]) -> Tensor:
        kind = "image" if name == "pixel_values" else "video"
        grids = torch.as_tensor(inputs[f"{kind}_grid_thw"]).view(-1, 3).tolist()
        width = int(torch.as_tensor(inputs[name]).shape[-1]) if name in inputs else None
        out = []
        index = 0
        for sample in canvases:
            for canvas in sample:
                if (canvas.dim() - 1 == 3) != (kind == "video"):
                    continue
                t, h, w = grids[index]
                index += 1
                k = canvas.shape[0]
                frames = canvas.unsqueeze(1).expand(k, temporal, h * patch, w * patch)
                if kind == "video":
                    frames = canvas
                cells = frames.reshape(
                    k, t, temporal, h // merge, merge, patch, w // merge, merge, patch
                ).permute(0, 1, 3, 6, 4, 7, 2, 5, 8)
                out.append(cells.reshape(k, t * h * w, 1, temporal * patch * patch))
        rows = torch.cat(out, dim=1)
        channels = 1 if width is None else width // (temporal * patch * patch)
        return rows.expand(-1, -1, channels, -1).flatten(2)

    return ViewRules(
        describe=describe,
        main_input=main_input,
        per_token={"mm_token_type_ids": 0},
        build=build,
        batch_first=False,
        to_input=to_input,
        state=("rope_deltas",),
    )


#: The classes this module describes.
CLASSES = QWEN_VL


def rules(config: Any) -> ViewRules:
    """The family's :class:`~captum_legrad.views.ViewRules` (:func:`qwen_rules`)."""
    return qwen_rules(config)


def token_step(config: Any) -> int:
    """The pixels one merged token covers per side: ``patch_size · spatial_merge_size``."""
    vision = config.vision_config
    return _ints(vision.patch_size)[0] * int(vision.spatial_merge_size)
