"""The evaluation harness: run attribution methods on batches and sum the metrics.

A dataset is turned into :class:`EvalBatch` es, each holding (image, target) *pairs*: an image
with two labelled objects appears twice, once per target. Every method is called through
Captum's interface, ``method.attribute(images, target=targets)``, and its maps (averaged over
channels) are scored by :mod:`captum_legrad.eval.metrics`. Results are kept as sums
(:class:`~captum_legrad.eval.metrics.MetricSums`), so batches, shards and processes add up
and the final numbers do not depend on how the data were split.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from captum.attr import Attribution
from torch import Tensor, nn

from ..attribution import LeGrad
from ..baselines import (
    AttentionRollout,
    GenericAttention,
    InputXGradientMap,
    IntegratedGradientsMap,
    RawAttention,
    SaliencyMap,
    ViTGradCAM,
)
from ..discovery import discover
from ..spec import ViTSpec
from .metrics import (
    DEFAULT_FRACTIONS,
    MetricSums,
    ScoreFn,
    area_under_curve,
    multilabel_correct,
    perturbation_curve,
    pixel_ap,
    point_counts,
    pointing_game,
    segmentation_counts,
    sigmoid_probability,
    softmax_probability,
    top1_correct,
)

__all__ = [
    "METHODS",
    "METHOD_NAMES",
    "EvalBatch",
    "EvalConfig",
    "EvalOutcome",
    "build_methods",
    "evaluate_batch",
    "evaluate_batches",
    "empty_sums",
    "summarize",
    "COLUMNS",
    "mean_curves",
]

MethodFactory = Callable[[nn.Module, ViTSpec], Attribution]

#: Method key → (display name, factory). ``legrad`` first, then the baselines.
METHODS: Dict[str, Tuple[str, MethodFactory]] = {
    "legrad": ("LeGrad", lambda model, spec: LeGrad(model, spec=spec)),
    "gae": ("Chefer GAE", lambda model, spec: GenericAttention(model, spec=spec)),
    "gradcam": ("GradCAM", lambda model, spec: ViTGradCAM(model, spec=spec)),
    "rollout": ("Attention rollout", lambda model, spec: AttentionRollout(model, spec=spec)),
    "attention": ("Raw attention", lambda model, spec: RawAttention(model, spec=spec)),
    "saliency": ("Saliency", lambda model, spec: SaliencyMap(model)),
    "inputxgradient": ("InputXGradient", lambda model, spec: InputXGradientMap(model)),
    "ig": ("IntegratedGradients", lambda model, spec: IntegratedGradientsMap(model)),
}
#: All method keys, in table order.
METHOD_NAMES: Tuple[str, ...] = tuple(METHODS)


@dataclass
class EvalBatch:
    """(image, target) pairs to explain, with what each metric needs.

    Attributes:
        images: ``(P, C, H, W)`` model inputs (normalised as the model expects).
        targets: ``(P,)`` class (or prompt) index explained in each pair.
        masks: ``(P, H, W)`` ground-truth masks, or None (no mask metrics).
        points: per pair, ``(Q, 2)`` labelled points ``(x, y)`` in pixels, or None.
        point_labels: per pair, ``(Q,)`` bool (positive / negative point), or None.
        correct: ``(P,)`` 1.0 where the model classifies the pair's image right (only
                    counted on the first pair of each image, see ``first``), or None.
        first: ``(P,)`` bool, True for the first pair of each image.
    """

    images: Tensor
    targets: Tensor
    masks: Optional[Tensor] = None
    points: Optional[List[Tensor]] = None
    point_labels: Optional[List[Tensor]] = None
    correct: Optional[Tensor] = None
    first: Optional[Tensor] = None


@dataclass(frozen=True)
class EvalConfig:
    """What to measure.

    Attributes:
        patch_size: Patch size for the perturbation tests (the model's).
        multilabel: Perturbation scores as multi-label (target logit > 0 / sigmoid) instead
                    of single-label (arg-max / softmax).
        perturbation: Run the positive / negative perturbation tests.
        threshold: Binarisation threshold of the segmentation metrics (0.5 or ``"mean"``).
        fractions: Fractions of patches removed in the perturbation tests.
        num_point_classes: Number of classes for point-label p-mIoU (0: not measured).
        baseline: Value of removed pixels in the perturbation tests.
        pointing_tolerance: Pointing-game tolerance in pixels; None: the original protocol's
                    15 pixels at 224, scaled to the image's shorter side (4 pixels at 64).
    """

    patch_size: Tuple[int, int]
    multilabel: bool = False
    perturbation: bool = True
    threshold: Union[float, str] = 0.5
    fractions: Tuple[float, ...] = DEFAULT_FRACTIONS
    num_point_classes: int = 0
    baseline: float = 0.0
    pointing_tolerance: Optional[int] = None

    def tolerance_for(self, height: int, width: int) -> int:
        """The pointing-game tolerance for ``height`` × ``width`` maps."""
        if self.pointing_tolerance is not None:
            return self.pointing_tolerance
        return round(15 * min(height, width) / 224)


def build_methods(
    model: nn.Module, names: Sequence[str], spec: Optional[ViTSpec] = None
) -> Dict[str, Attribution]:
    """Instantiate the methods ``names`` (keys of :data:`METHODS`) for ``model``."""
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHOD_NAMES)}")
    spec = discover(model) if spec is None else spec
    return {name: METHODS[name][1](model, spec) for name in names}


def empty_sums(config: EvalConfig) -> MetricSums:
    """Zero sums with every name :func:`evaluate_batches` adds to (the same on all ranks)."""
    steps = len(config.fractions)
    shapes: Dict[str, Tuple[int, ...]] = {
        "pairs": (),
        "masked": (),
        "hits": (),
        "intersection": (2,),
        "union": (2,),
        "correct": (),
        "labeled": (),
        "ap_sum": (),
        "ap_count": (),
        "seconds": (),
    }
    if config.perturbation:
        for mode in ("positive", "negative"):
            shapes[f"{mode}_accuracy"] = (steps,)
            shapes[f"{mode}_probability"] = (steps,)
    if config.num_point_classes:
        shapes["point_counts"] = (config.num_point_classes, 3)
    return MetricSums.zeros(shapes)


def _score_fns(config: EvalConfig) -> Tuple[ScoreFn, ScoreFn]:
    if config.multilabel:
        return multilabel_correct, sigmoid_probability
    return top1_correct, softmax_probability


def _maps(method: Attribution, batch: EvalBatch) -> Tensor:
    attr = method.attribute(batch.images, target=batch.targets)
    if not isinstance(attr, Tensor):
        raise TypeError(f"{method.get_name()} returned {type(attr).__name__}, not a tensor.")
    maps = attr.detach().float()
    maps = maps.mean(dim=1) if maps.dim() == 4 else maps
    return torch.nan_to_num(maps, nan=0.0, posinf=0.0, neginf=0.0)


def evaluate_batch(
    model: nn.Module,
    method: Attribution,
    batch: EvalBatch,
    sums: MetricSums,
    config: EvalConfig,
) -> Tensor:
    """Explain one batch with ``method``, add its metrics to ``sums``; returns the maps."""
    start = time.perf_counter()
    maps = _maps(method, batch)
    sums.add("seconds", time.perf_counter() - start)
    sums.add("pairs", float(maps.shape[0]))
    if batch.masks is not None:
        masks = batch.masks.bool()
        sums.add("masked", float(maps.shape[0]))
        tolerance = config.tolerance_for(maps.shape[-2], maps.shape[-1])
        sums.add("hits", pointing_game(maps, masks, tolerance).double().sum())
        counts = segmentation_counts(maps, masks, config.threshold)
        for name in ("intersection", "union", "correct", "labeled"):
            sums.add(name, counts[name].sum(dim=0))
        ap = pixel_ap(maps, masks)
        finite = torch.isfinite(ap)
        sums.add("ap_sum", ap[finite].sum())
        sums.add("ap_count", float(finite.sum()))
    if config.num_point_classes and batch.points is not None and batch.point_labels is not None:
        table = torch.zeros(config.num_point_classes, 3, dtype=torch.float64)
        for heat, cls, pts, labels in zip(maps, batch.targets, batch.points, batch.point_labels):
            table[int(cls)] += point_counts(heat, pts, labels, config.threshold)
        sums.add("point_counts", table)
    if config.perturbation:
        correct_fn, probability_fn = _score_fns(config)
        for mode in ("positive", "negative"):
            accuracy, probability = perturbation_curve(
                model,
                batch.images,
                maps,
                batch.targets,
                patch_size=config.patch_size,
                mode=mode,
                fractions=config.fractions,
                baseline=config.baseline,
                scores=(correct_fn, probability_fn),
            )
            sums.add(f"{mode}_accuracy", accuracy.sum(dim=0))
            sums.add(f"{mode}_probability", probability.sum(dim=0))
    return maps


@dataclass
class EvalOutcome:
    """Sums from :func:`evaluate_batches`, before or after reduction over processes.

    Attributes:
        sums: Method key → metric sums.
        model_sums: ``images`` evaluated, and ``correct`` / ``labelled`` for the model's
                    classification accuracy where the data have labels.
        example_batch: The first batch (for pictures), if ``examples`` was asked.
        example_maps: Method key → maps of the first ``examples`` pairs of that batch.
    """

    sums: Dict[str, MetricSums]
    model_sums: MetricSums
    example_batch: Optional[EvalBatch] = None
    example_maps: Optional[Dict[str, Tensor]] = None

    def all_reduce(self, device: Optional[torch.device] = None) -> None:
        """Sum every metric over all processes (no-op without a process group)."""
        for value in [*self.sums.values(), self.model_sums]:
            value.all_reduce(device)

    def results(self, config: EvalConfig) -> Dict[str, Dict[str, float]]:
        """Method key → final metrics (:func:`summarize`)."""
        return {name: summarize(value, config) for name, value in self.sums.items()}

    def curves(self, kind: str = "accuracy") -> Dict[str, Tuple[Tensor, Tensor]]:
        """Method key → mean (positive, negative) perturbation curves, where measured."""
        found = {name: mean_curves(value, kind) for name, value in self.sums.items()}
        return {name: pair for name, pair in found.items() if pair is not None}

    @property
    def images(self) -> int:
        """Number of images evaluated."""
        return int(self.model_sums["images"])

    @property
    def accuracy(self) -> float:
        """The model's classification accuracy in percent (NaN without labels)."""
        labelled = float(self.model_sums["labelled"])
        return float(100 * self.model_sums["correct"] / labelled) if labelled else float("nan")


def evaluate_batches(
    model: nn.Module,
    methods: Mapping[str, Attribution],
    batches: Iterable[EvalBatch],
    config: EvalConfig,
    *,
    progress: Optional[Callable[[int], None]] = None,
    examples: int = 0,
) -> EvalOutcome:
    """Run every method on every batch and add up the metrics.

    Args:
        model (nn.Module): The model (for perturbation tests).
        methods (Mapping[str, Attribution]): Method key → attribution.
        batches (Iterable[EvalBatch]): The data (already sharded for this process).
        config (EvalConfig): What to measure.
        progress (Callable[[int], None], optional): Called with 1 after each batch (e.g. a
                    progress bar's ``update``).
        examples (int, optional): Keep the maps of this many pairs of the first batch.
                    Default: 0

    Returns:
        An :class:`EvalOutcome` (this process's sums; see :meth:`EvalOutcome.all_reduce`).
    """
    outcome = EvalOutcome(
        sums={name: empty_sums(config) for name in methods},
        model_sums=MetricSums.zeros({"images": (), "correct": (), "labelled": ()}),
    )
    for batch in batches:
        first = batch.first if batch.first is not None else torch.ones_like(batch.targets).bool()
        outcome.model_sums.add("images", float(first.sum()))
        if batch.correct is not None:
            outcome.model_sums.add("correct", batch.correct[first].sum())
            outcome.model_sums.add("labelled", float(first.sum()))
        keep = examples > 0 and outcome.example_batch is None
        if keep:
            outcome.example_batch, outcome.example_maps = batch, {}
        for name, method in methods.items():
            maps = evaluate_batch(model, method, batch, outcome.sums[name], config)
            if keep and outcome.example_maps is not None:
                outcome.example_maps[name] = maps[:examples].cpu()
        if progress is not None:
            progress(1)
    return outcome


#: Table columns: (key, header). Percentages; AUCs are areas × 100 over 0–90 % removed.
COLUMNS: Tuple[Tuple[str, str], ...] = (
    ("pointing_game", "Pointing game ↑"),
    ("miou", "mIoU ↑"),
    ("pixel_accuracy", "Pixel acc. ↑"),
    ("ap", "AP ↑"),
    ("positive_auc", "Pos. pert. AUC ↓"),
    ("negative_auc", "Neg. pert. AUC ↑"),
    ("p_miou", "p-mIoU ↑"),
)


def summarize(sums: MetricSums, config: EvalConfig) -> Dict[str, float]:
    """Final metrics (percentages) from (reduced) sums; NaN where not measured."""
    nan = float("nan")

    def ratio(num: Tensor, den: Tensor) -> float:
        return float(100.0 * num / den) if float(den) > 0 else nan

    result: Dict[str, float] = {name: nan for name, _ in COLUMNS}
    result["pairs"] = float(sums["pairs"])
    result["seconds_per_map"] = (
        float(sums["seconds"] / sums["pairs"]) if float(sums["pairs"]) > 0 else nan
    )
    if float(sums["masked"]) > 0:
        result["pointing_game"] = ratio(sums["hits"], sums["masked"])
        iou = sums["intersection"] / sums["union"].clamp(min=1.0)
        result["miou"] = float(100.0 * iou.mean())
        result["iou_background"] = float(100.0 * iou[0])
        result["iou_foreground"] = float(100.0 * iou[1])
        result["pixel_accuracy"] = ratio(sums["correct"], sums["labeled"])
        result["ap"] = ratio(sums["ap_sum"], sums["ap_count"])
    if config.perturbation and float(sums["pairs"]) > 0:
        for mode in ("positive", "negative"):
            for kind in ("accuracy", "probability"):
                curve = sums[f"{mode}_{kind}"] / sums["pairs"]
                area = float(100.0 * area_under_curve(curve, config.fractions))
                suffix = "" if kind == "accuracy" else "_probability"
                result[f"{mode}_auc{suffix}"] = area
    if config.num_point_classes:
        counts = sums["point_counts"]
        denominator = counts.sum(dim=1)
        seen = denominator > 0
        if bool(seen.any()):
            per_class = counts[seen, 0] / denominator[seen]
            result["p_miou"] = float(100.0 * per_class.mean())
    return result


def mean_curves(sums: MetricSums, kind: str = "accuracy") -> Optional[Tuple[Tensor, Tensor]]:
    """Mean positive and negative perturbation curves (``kind``: accuracy or probability)."""
    if f"positive_{kind}" not in sums.sums or float(sums["pairs"]) == 0:
        return None
    pairs = sums["pairs"]
    return sums[f"positive_{kind}"] / pairs, sums[f"negative_{kind}"] / pairs
