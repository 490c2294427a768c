"""Where a vision-language model's image tokens come from: views of the original images.

A VLM turns each image (or video) of a prompt into one or more *views*: the whole image at
some resolution, tiles or crops of it, a thumbnail. Each view is a grid of tokens at known
positions of the prompt and covers a known rectangle (and, for video, a frame range) of
the original image, its *source*. A family adapter describes this once per family
(:class:`ViewRules`); the rest is written here once:

* :func:`token_layout`: every view's tokens of every sample as one per-sample token
  sequence (a :class:`~captum_legrad.spec.PatchLayout` of rank 1) for the LeGrad
  computation;
* :func:`view_maps`: a sample's token maps cut into its views' grids (``(K, h, w)`` for an
  image view, ``(K, t, h, w)`` for a video view, tokens row-major);
* :func:`source_maps`: the views' maps placed on their source's canvas, each view
  upsampled to its rectangle; where several views cover the same pixels the canvas holds
  their **mean**, and pixels no view covers (padding) are left out (``docs/method.md``,
  "Views").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._core.maps import upsample
from .spec import PatchLayout

__all__ = ["Source", "View", "SampleViews", "ViewRules", "token_layout", "view_maps", "source_maps"]

_KINDS = ("image", "video")


@dataclass(frozen=True)
class Source:
    """One image or video of a sample: the canvas its views are mapped back to.

    Attributes:
        kind: ``"image"`` or ``"video"``.
        size: ``(H, W)`` pixels of an image, ``(T, H, W)`` frames and pixels of a video: the
            original image's size as far as the model's inputs tell it (the processor's
            ``image_sizes``; for Qwen-VL, which returns none, the size the processor
            resized the image to, ``grid × patch``).
    """

    kind: str
    size: Tuple[int, ...]

    def __post_init__(self) -> None:
        rank = 2 if self.kind == "image" else 3
        if self.kind not in _KINDS or len(self.size) != rank or min(self.size) < 1:
            raise ValueError(
                f"A Source is an 'image' of size (H, W) or a 'video' of size (T, H, W), got "
                f"{self.kind!r} of size {self.size}."
            )


@dataclass(frozen=True)
class View:
    """One grid of image tokens and the part of its source it covers.

    Attributes:
        positions: ``(n,)`` the sequence positions of the view's tokens, in row-major grid
            order; separator, newline and other non-grid tokens are not listed.
        grid: The token grid: ``(h, w)`` for an image view, ``(t, h, w)`` for a video view;
            ``n = prod(grid)``.
        source: Which image or video of the sample (index into
            :attr:`SampleViews.sources`, prompt order).
        box: ``(top, left, bottom, right)`` pixels of the source's canvas the view covers
            (bottom and right exclusive). It may reach beyond the canvas (a view of a padded
            copy, LLaVA-NeXT's crops): the view is upsampled to the whole box and cut to the
            canvas; it must overlap the canvas.
        frames: ``(start, stop)`` frames of a video source the view covers; None for images.
        name: What the view is, for messages and figures (``"image"``, ``"video"``,
            ``"tile 0,1"``, ``"thumbnail"``).
    """

    positions: Tensor
    grid: Tuple[int, ...]
    source: int
    box: Tuple[int, int, int, int]
    frames: Optional[Tuple[int, int]] = None
    name: str = "image"

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
        n = 1
        for g in self.grid:
            n *= g
        if self.positions.dim() != 1 or self.positions.numel() != n or n == 0:
            raise ValueError(
                f"View {self.name!r}: {tuple(self.positions.shape)} positions for a "
                f"{'x'.join(map(str, self.grid))} grid; give one position per grid cell."
            )
        top, left, bottom, right = self.box
        if not (top < bottom and left < right):
            raise ValueError(f"View {self.name!r}: the box {self.box} is empty.")
        if (len(self.grid) == 3) != (self.frames is not None):
            raise ValueError(
                f"View {self.name!r}: a video view has a (t, h, w) grid and a frame range, an "
                f"image view an (h, w) grid and none; got {self.grid} and frames {self.frames}."
            )

    @property
    def rank(self) -> int:
        """2 for image views, 3 for video views."""
        return len(self.grid)


@dataclass(frozen=True)
class SampleViews:
    """All views of one sample, in the order their tokens are laid out for LeGrad.

    Attributes:
        sources: The sample's images and videos (prompt order).
        views: Their views; every source has at least one.
    """

    sources: Tuple[Source, ...]
    views: Tuple[View, ...]

    def __post_init__(self) -> None:
        for view in self.views:
            if not 0 <= view.source < len(self.sources):
                raise ValueError(
                    f"View {view.name!r} belongs to source {view.source}, but the sample has "
                    f"{len(self.sources)} sources."
                )
            source = self.sources[view.source]
            if (source.kind == "video") != (view.rank == 3):
                raise ValueError(f"View {view.name!r} of a {source.kind} has grid {view.grid}.")
            height, width = source.size[-2:]
            top, left, bottom, right = view.box
            if top >= height or left >= width or bottom <= 0 or right <= 0:
                raise ValueError(
                    f"View {view.name!r} covers {view.box}, outside its source's {height}x{width} "
                    "canvas."
                )
            if (
                view.frames is not None
                and not 0 <= view.frames[0] < view.frames[1] <= (source.size[0])
            ):
                raise ValueError(f"View {view.name!r} covers frames {view.frames}, outside.")
        covered = {view.source for view in self.views}
        if covered != set(range(len(self.sources))):
            raise ValueError("Every source of a sample needs at least one view.")

    @property
    def num_tokens(self) -> int:
        """The image tokens of all views."""
        return sum(int(view.positions.numel()) for view in self.views)

    def positions(self) -> Tensor:
        """All views' token positions, view after view: the sample's token order."""
        if not self.views:
            return torch.zeros(0, dtype=torch.long)
        return torch.cat([view.positions.long().cpu() for view in self.views])


@dataclass(frozen=True)
class ViewRules:
    """What a vision-language family adapter provides so that
    :class:`~captum_legrad.AnswerLogits` explains its image tokens through views.

    Attributes:
        describe: ``(input_ids (B, S), attention_mask (B, S), model_inputs) → [SampleViews]``:
            where each sample's image tokens are and what they cover. Positions index the
            given rows (0 in the mask: padding, never an image token).
        main_input: ``model_inputs → name``: the model input the explained tensor (LeGrad's
            first input) is passed as (``"pixel_values"``; Qwen-VL with only a video:
            ``"pixel_values_videos"``).
        per_token: Per-token model inputs (``(B, S, ...)``, one row per token like
            ``input_ids``) and the value they take over the answer tokens
            (``{"mm_token_type_ids": 0}``); None repeats the prompt's last row over the
            answer (Mllama's ``cross_attention_mask``, as ``generate`` extends it).
        build: ``input_ids → {name: (B, S)}``: the per-token inputs the processor would
            return, for callers who do not pass them; None when they are required.
        batch_first: Whether dim 0 of the explained tensor is the batch. False for
            flattened patches of every image (Qwen-VL): the batch is then ``input_ids``'
            rows and the tensor is never split.
        to_input: ``(canvases, name, model_inputs) → Tensor`` for ``output="input"``: the
            per-sample, per-source canvas maps ``(K, *source.size)`` in the shape of the
            explained tensor, with ``K`` after its first dimension; None: ``"input"`` is
            refused with a pointer to ``"map"``.
        state: Attributes of the base model (``model.model``) its forward writes (Qwen-VL's
            cached ``rope_deltas``), restored after every call so the model is unchanged.
        consumed: Inputs ``describe`` reads that the model's forward does not take (the
            original ``image_sizes`` of InternVL and Llama 4, whose processors do not
            return them; Gemma 4's ``num_soft_tokens_per_image``): never passed to the model.
        cross_keys: For cross-attention families (Mllama), whose blocks attend from the text
            positions to the vision tokens: ``model_inputs → int``, the number of keys of
            that attention; the views' ``positions`` then index those keys, not the
            sequence. None: the blocks attend over the sequence.
    """

    describe: Callable[[Tensor, Tensor, Mapping[str, Any]], List[SampleViews]]
    main_input: Callable[[Mapping[str, Any]], str]
    per_token: Mapping[str, Optional[int]] = field(default_factory=dict)
    build: Optional[Callable[[Tensor], Dict[str, Tensor]]] = None
    batch_first: bool = True
    to_input: Optional[Callable[[List[List[Tensor]], str, Mapping[str, Any]], Tensor]] = None
    state: Tuple[str, ...] = ()
    consumed: Tuple[str, ...] = ()
    cross_keys: Optional[Callable[[Mapping[str, Any]], int]] = None


def token_layout(samples: Sequence[SampleViews]) -> PatchLayout:
    """Every sample's view tokens as one token sequence: ``(B, n_max)`` keys (``-1`` past a
    sample's own tokens), grid ``(n_max,)``, per-sample grids ``(B, 1)``."""
    counts = [s.num_tokens for s in samples]
    longest = max(counts) if counts else 0
    if longest == 0:
        raise ValueError(
            "No sample holds an image token: build input_ids with the model's processor, "
            "with the images (or videos) in the prompt."
        )
    keys = torch.full((len(samples), longest), -1, dtype=torch.long)
    for b, sample in enumerate(samples):
        keys[b, : counts[b]] = sample.positions()
    grids = torch.tensor(counts, dtype=torch.long).unsqueeze(1)
    return PatchLayout(keys, (longest,), grids, torch.ones(len(samples)))


def view_maps(tokens: Tensor, sample: SampleViews) -> List[Tensor]:
    """A sample's token maps ``(K, n)`` (its :func:`token_layout` order; longer rows are
    cut) → one map per view, ``(K, *view.grid)``."""
    out, start = [], 0
    for view in sample.views:
        n = int(view.positions.numel())
        out.append(tokens[:, start : start + n].reshape(tokens.shape[0], *view.grid))
        start += n
    return out


def source_maps(
    maps: Sequence[Tensor], sample: SampleViews, mode: str = "bilinear"
) -> List[Tuple[Tensor, Tensor]]:
    """The views' maps ``(K, *grid)`` on their sources' canvases: per source ``(K, *size)``
    and the boolean ``size`` mask of the pixels some view covers.

    Each view is upsampled (``mode``, ``align_corners=False``; trilinear over a video's
    frames) to its box and frame range; pixels covered by several views get the mean of
    those views' values, pixels no view covers are 0 and outside the mask.
    """
    out = []
    for index, source in enumerate(sample.sources):
        k = maps[0].shape[0] if maps else 1
        like = maps[0] if maps else torch.zeros(1)
        total = like.new_zeros((k, *source.size))
        count = torch.zeros(source.size, dtype=like.dtype, device=like.device)
        for view, values in zip(sample.views, maps):
            if view.source != index:
                continue
            top, left, bottom, right = view.box
            height, width = source.size[-2:]
            # A box may reach beyond the canvas (a view of a padded copy): upsampled to the
            # whole box, then cut to the canvas.
            region: Tuple[slice, ...] = (
                slice(max(top, 0), min(bottom, height)),
                slice(max(left, 0), min(right, width)),
            )
            cut: Tuple[slice, ...] = (
                slice(max(top, 0) - top, min(bottom, height) - top),
                slice(max(left, 0) - left, min(right, width) - left),
            )
            size: Tuple[int, ...] = (bottom - top, right - left)
            if view.frames is not None:
                region = (slice(*view.frames), *region)
                cut = (slice(None), *cut)
                size = (view.frames[1] - view.frames[0], *size)
            up = upsample(values.unsqueeze(0).to(total.dtype), size, mode)[0]
            total[(slice(None), *region)] += up[(slice(None), *cut)]
            count[region] += 1
        out.append((total / count.clamp(min=1), count > 0))
    return out
