"""Localisation and faithfulness metrics for saliency maps.

All functions take batches of maps ``(N, H, W)`` (any real values; they are min-max
normalised per map where the protocol says so) and return per-map values as tensors, so a
harness can sum them over a dataset and over processes (:class:`MetricSums`).

- :func:`pointing_game`: is the map's maximum inside the object mask?
- :func:`segmentation_counts` / :func:`binarize`: the ImageNet-segmentation protocol of
  Chefer et al. (maps min-max normalised and binarised, here at 0.5 as in LeGrad; pixel
  accuracy and the background/foreground IoU, accumulated over the dataset and averaged
  over the two classes).
- :func:`average_precision` / :func:`pixel_ap`: average precision of the map values as
  scores of the mask pixels.
- :func:`point_counts`: the OpenImagesV7 point-label counts behind LeGrad's p-mIoU.
- :func:`perturbation_curve` / :func:`area_under_curve`: positive / negative perturbation
  (delete the most / least relevant patches first, 0–90 %), the model's accuracy or
  target probability at each step, and the area under that curve.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .._core.maps import minmax_normalize

__all__ = [
    "DEFAULT_FRACTIONS",
    "ScoreFn",
    "minmax_normalize",
    "pointing_game",
    "binarize",
    "segmentation_counts",
    "average_precision",
    "pixel_ap",
    "point_counts",
    "perturbation_curve",
    "area_under_curve",
    "top1_correct",
    "softmax_probability",
    "multilabel_correct",
    "sigmoid_probability",
    "MetricSums",
]

#: Fractions of patches removed: 0 %, 10 %, ..., 90 % (the paper's 0–90 % protocol).
DEFAULT_FRACTIONS: Tuple[float, ...] = tuple(i / 10 for i in range(10))

#: ``score(logits (B, C), target (B,)) -> (B,)`` for perturbation curves.
ScoreFn = Callable[[Tensor, Tensor], Tensor]


def _check_pair(maps: Tensor, masks: Tensor) -> None:
    if maps.dim() != 3 or masks.shape != maps.shape:
        raise ValueError(
            f"maps and masks must both be (N, H, W) of the same shape, got {tuple(maps.shape)} "
            f"and {tuple(masks.shape)}."
        )


def pointing_game(maps: Tensor, masks: Tensor, tolerance: int = 0) -> Tensor:
    """Whether each map's maximum falls on its object.

    The maximum is the first pixel in raster order that attains the map's largest value;
    it counts as a hit when it lies within ``tolerance`` pixels (Euclidean distance) of the
    mask. Zhang et al.'s protocol uses 15 pixels at 224 × 224.

    Args:
        maps (Tensor): ``(N, H, W)`` saliency maps.
        masks (Tensor): ``(N, H, W)`` object masks (bool or 0/1).
        tolerance (int, optional): Distance in pixels within which a maximum next to the
                    mask still counts.
                    Default: 0

    Returns:
        *Tensor* ``(N,)`` bool, one hit or miss per map.
    """
    _check_pair(maps, masks)
    masks = masks.bool()
    if tolerance > 0:
        offsets = torch.arange(-tolerance, tolerance + 1, dtype=torch.float32)
        disc = (offsets[:, None] ** 2 + offsets[None, :] ** 2 <= tolerance**2).float()
        dilated = F.conv2d(
            masks[:, None].float(), disc[None, None].to(masks.device), padding=tolerance
        )
        masks = dilated[:, 0] > 0
    flat = maps.flatten(1)
    peak = flat.argmax(dim=1)
    return masks.flatten(1).gather(1, peak[:, None])[:, 0]


def binarize(maps: Tensor, threshold: Union[float, str] = 0.5) -> Tensor:
    """Foreground of min-max normalised maps: ``normalised > threshold``.

    Args:
        maps (Tensor): ``(..., H, W)`` maps, normalised here per map (a constant map is all
                    background).
        threshold (float or str, optional): A number in [0, 1] (LeGrad's protocol uses 0.5),
                    or ``"mean"`` for each normalised map's mean (Chefer et al.'s script).
                    Default: 0.5

    Returns:
        *Tensor* of bools, the shape of ``maps``.
    """
    normalised = minmax_normalize(maps)
    if threshold == "mean":
        level = normalised.flatten(-2).mean(dim=-1)[..., None, None]
        return normalised > level
    if isinstance(threshold, str):
        raise ValueError(f"threshold must be a number or 'mean', got {threshold!r}.")
    return normalised > float(threshold)


def segmentation_counts(
    maps: Tensor, masks: Tensor, threshold: Union[float, str] = 0.5
) -> Dict[str, Tensor]:
    """Per-map counts of the ImageNet-segmentation protocol (Chefer et al. 2021).

    Maps are binarised with :func:`binarize`. Summed over a dataset, ``correct / labeled``
    is the pixel accuracy and ``intersection / union`` the IoU of the background (column 0)
    and foreground (column 1); their mean is the mIoU.

    Args:
        maps (Tensor): ``(N, H, W)`` saliency maps.
        masks (Tensor): ``(N, H, W)`` ground-truth masks.
        threshold (float or str, optional): See :func:`binarize`.
                    Default: 0.5

    Returns:
        *dict* with ``"intersection"`` and ``"union"`` ``(N, 2)`` and ``"correct"`` and
        ``"labeled"`` ``(N,)``, all float64 pixel counts.
    """
    _check_pair(maps, masks)
    predicted = binarize(maps, threshold).flatten(1)
    truth = masks.bool().flatten(1)
    inter_fg = (predicted & truth).sum(1)
    inter_bg = (~predicted & ~truth).sum(1)
    union_fg = (predicted | truth).sum(1)
    union_bg = (~predicted | ~truth).sum(1)
    return {
        "intersection": torch.stack([inter_bg, inter_fg], dim=1).double(),
        "union": torch.stack([union_bg, union_fg], dim=1).double(),
        "correct": (predicted == truth).sum(1).double(),
        "labeled": torch.full((maps.shape[0],), float(truth.shape[1]), dtype=torch.float64),
    }


def _batched_ap(scores: Tensor, labels: Tensor) -> Tensor:
    """Average precision of each row: ``(N, M)`` scores and bool labels → ``(N,)``."""
    scores, labels = scores.double(), labels.bool()
    positives = labels.sum(dim=1)
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    ordered = scores.gather(1, order)
    tp = labels.gather(1, order).double().cumsum(dim=1)
    seen = torch.arange(1, scores.shape[1] + 1, dtype=torch.float64).expand_as(tp)
    # A threshold at every distinct score: the last position of each run of equal scores.
    run_end = torch.ones_like(ordered, dtype=torch.bool)
    run_end[:, :-1] = ordered[:, 1:] != ordered[:, :-1]
    end_tp = torch.where(run_end, tp, torch.zeros_like(tp))
    previous = torch.cat([torch.zeros_like(tp[:, :1]), end_tp.cummax(dim=1).values[:, :-1]], 1)
    gains = torch.where(run_end, (tp - previous) * tp / seen, torch.zeros_like(tp))
    ap = gains.sum(dim=1) / positives.clamp(min=1)
    return torch.where(positives > 0, ap, torch.full_like(ap, float("nan")))


def average_precision(scores: Tensor, labels: Tensor) -> Tensor:
    """Average precision of ``scores`` for binary ``labels`` (1-D), as scikit-learn defines it.

    ``AP = Σ_k (R_k − R_{k−1}) P_k`` over the distinct score values taken as thresholds in
    decreasing order (tied scores enter together). NaN when there is no positive label.
    """
    return _batched_ap(scores.flatten()[None], labels.flatten()[None])[0]


def pixel_ap(maps: Tensor, masks: Tensor, two_class: bool = False) -> Tensor:
    """Pixel average precision of each map against its mask.

    Args:
        maps (Tensor): ``(N, H, W)`` saliency maps (scores; only their order matters unless
                    ``two_class``).
        masks (Tensor): ``(N, H, W)`` ground-truth masks.
        two_class (bool, optional): Chefer et al.'s variant: the min-max normalised map
                    scores the foreground and ``1 - map`` the background, both pixel sets
                    pooled into one AP.
                    Default: False

    Returns:
        *Tensor* ``(N,)`` float64; NaN for an empty mask.
    """
    _check_pair(maps, masks)
    scores, labels = maps.flatten(1), masks.bool().flatten(1)
    if two_class:
        norm = minmax_normalize(maps).flatten(1)
        scores = torch.cat([1 - norm, norm], dim=1)
        labels = torch.cat([~labels, labels], dim=1)
    return _batched_ap(scores, labels)


def point_counts(
    heat: Tensor,
    points: Tensor,
    positive: Tensor,
    threshold: Union[float, str] = 0.5,
) -> Tensor:
    """Point-label counts of one map: ``[TP, FP, FN]`` (float64) for LeGrad's p-mIoU.

    The map is min-max normalised and binarised at ``threshold``; each labelled point reads
    the pixel it falls in. A positive point on the foreground is a true positive, on the
    background a false negative; a negative point on the foreground is a false positive.
    Per class, ``TP / (TP + FP + FN)`` summed over a dataset is the class's IoU; p-mIoU is
    their mean over classes.

    Args:
        heat (Tensor): ``(H, W)`` map.
        points (Tensor): ``(P, 2)`` point coordinates ``(x, y)`` in pixels of ``heat``.
        positive (Tensor): ``(P,)`` bool, the label of each point.
        threshold (float or str, optional): Binarisation threshold (see :func:`binarize`).
                    Default: 0.5

    Returns:
        *Tensor* ``(3,)``: true positives, false positives, false negatives.
    """
    height, width = heat.shape
    fg = binarize(heat, threshold)
    cols = points[:, 0].floor().long().clamp(0, width - 1)
    rows = points[:, 1].floor().long().clamp(0, height - 1)
    on = fg[rows, cols]
    pos = positive.bool()
    return torch.stack([(on & pos).sum(), (on & ~pos).sum(), (~on & pos).sum()]).double()


def top1_correct(logits: Tensor, target: Tensor) -> Tensor:
    """1.0 where the arg-max class is ``target`` (single-label accuracy)."""
    return (logits.argmax(dim=1) == target).double()


def softmax_probability(logits: Tensor, target: Tensor) -> Tensor:
    """Softmax probability of ``target``."""
    return logits.softmax(dim=1).gather(1, target[:, None])[:, 0].double()


def multilabel_correct(logits: Tensor, target: Tensor) -> Tensor:
    """1.0 where ``target``'s logit is above 0 (multi-label: the class is detected)."""
    return (logits.gather(1, target[:, None])[:, 0] > 0).double()


def sigmoid_probability(logits: Tensor, target: Tensor) -> Tensor:
    """Sigmoid probability of ``target`` (multi-label)."""
    return logits.gather(1, target[:, None])[:, 0].sigmoid().double()


def perturbation_curve(
    forward_func: Callable[[Tensor], Tensor],
    images: Tensor,
    maps: Tensor,
    target: Tensor,
    *,
    patch_size: Tuple[int, int],
    mode: str = "positive",
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    baseline: float = 0.0,
    scores: Sequence[ScoreFn] = (top1_correct,),
    batch_size: int = 256,
) -> Tuple[Tensor, ...]:
    """Model scores while the most (positive) or least (negative) relevant patches are removed.

    A patch's relevance is the mean of the map over it. At fraction ``f``, the
    ``round(f · n_patches)`` most relevant (``mode="positive"``) or least relevant
    (``"negative"``) patches are set to ``baseline`` (ties broken by patch order) and the
    model is run on the result. A faithful map gives a steep positive curve (low area)
    and a flat negative curve (high area).

    Args:
        forward_func (Callable): The model, ``(B, C, H, W) -> (B, classes)``.
        images (Tensor): ``(B, C, H, W)`` model inputs.
        maps (Tensor): ``(B, H, W)`` saliency maps.
        target (Tensor): ``(B,)`` class explained per image.
        patch_size (tuple[int, int]): Patch height and width in pixels.
        mode (str, optional): ``"positive"`` or ``"negative"``.
                    Default: "positive"
        fractions (Sequence[float], optional): Fractions of patches removed.
                    Default: 0, 0.1, ..., 0.9
        baseline (float, optional): Value of removed pixels (0 = the mean colour for
                    normalised inputs).
                    Default: 0.0
        scores (Sequence[ScoreFn], optional): Functions of the logits and targets giving
                    the curve values, e.g. :func:`top1_correct` (accuracy) and
                    :func:`softmax_probability`.
                    Default: (top1_correct,)
        batch_size (int, optional): Perturbed images per forward.
                    Default: 256

    Returns:
        *tuple[Tensor, ...]*: one ``(B, len(fractions))`` float64 curve per score function.
    """
    if mode not in ("positive", "negative"):
        raise ValueError(f"mode must be 'positive' or 'negative', got {mode!r}.")
    batch, _, height, width = images.shape
    if maps.shape != (batch, height, width):
        raise ValueError(
            f"maps must be (B, H, W) = {(batch, height, width)}, got {tuple(maps.shape)}."
        )
    grid = (max(1, height // patch_size[0]), max(1, width // patch_size[1]))
    relevance = F.adaptive_avg_pool2d(maps[:, None].double(), grid).flatten(1)
    n_patches = relevance.shape[1]
    order = torch.argsort(relevance, dim=1, descending=(mode == "positive"), stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n_patches).expand(batch, -1).contiguous())
    perturbed = []
    for fraction in fractions:
        k = round(fraction * n_patches)
        removed = (rank < k).view(batch, 1, *grid).float()
        removed = F.interpolate(removed, size=(height, width), mode="nearest") > 0.5
        perturbed.append(torch.where(removed, torch.full_like(images, baseline), images))
    stacked = torch.cat(perturbed)  # (S·B, C, H, W), fraction-major
    repeated = target.repeat(len(fractions))
    values = [[] for _ in scores]  # type: list[list[Tensor]]
    with torch.no_grad():
        for start in range(0, stacked.shape[0], batch_size):
            logits = forward_func(stacked[start : start + batch_size])
            chunk = repeated[start : start + batch_size]
            for sink, score in zip(values, scores):
                sink.append(score(logits, chunk))
    return tuple(torch.cat(v).view(len(fractions), batch).T.contiguous() for v in values)


def area_under_curve(curve: Tensor, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> Tensor:
    """Trapezoidal area under ``curve`` (``(..., S)``) over ``fractions`` (not rescaled).

    Over the default 0–0.9 a curve constant at 1 has area 0.9.
    """
    x = torch.tensor(list(fractions), dtype=torch.float64)
    return torch.trapezoid(curve.double(), x, dim=-1)


class MetricSums:
    """Named float64 sums that add up over batches and, with :meth:`all_reduce`, processes.

    Every process must create the same names with the same shapes (see :meth:`zeros`)
    before adding, so the reduction works also for a process with an empty shard.

    Examples::

        >>> sums = MetricSums.zeros({"hits": (), "curve": (10,)})
        >>> sums.add("hits", torch.tensor([1.0, 0.0]).sum())
        >>> sums.all_reduce()  # no-op unless torch.distributed is initialised
    """

    def __init__(self, sums: Optional[Dict[str, Tensor]] = None) -> None:
        self.sums: Dict[str, Tensor] = dict(sums or {})

    @classmethod
    def zeros(cls, shapes: Dict[str, Tuple[int, ...]]) -> MetricSums:
        """All-zero sums with the given names and shapes."""
        return cls(
            {name: torch.zeros(shape, dtype=torch.float64) for name, shape in shapes.items()}
        )

    def add(self, name: str, value: Union[Tensor, float]) -> None:
        """Add ``value`` (a number or a tensor of the sum's shape) to the sum ``name``."""
        value = torch.as_tensor(value, dtype=torch.float64)
        self.sums[name] = self.sums[name] + value.detach().cpu()

    def __getitem__(self, name: str) -> Tensor:
        return self.sums[name]

    def names(self) -> Iterable[str]:
        """The names, sorted (the reduction order)."""
        return sorted(self.sums)

    def all_reduce(self, device: Optional[torch.device] = None) -> None:
        """Sum every entry over all processes (no-op without an initialised process group)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        for name in self.names():
            value = self.sums[name].to(device) if device is not None else self.sums[name].clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            self.sums[name] = value.cpu()
