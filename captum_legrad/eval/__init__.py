"""Evaluation harness: localisation and faithfulness metrics, paper-format loaders, runners.

- :mod:`~captum_legrad.eval.metrics`: pointing game, mIoU / pixel accuracy (Chefer et al.'s
  ImageNet-segmentation protocol at LeGrad's 0.5 threshold), pixel AP, point-label p-mIoU,
  positive / negative perturbation curves and their AUC.
- :mod:`~captum_legrad.eval.harness`: runs LeGrad and the baselines
  (:mod:`captum_legrad.baselines`) through Captum's ``attribute`` and sums the metrics.
- :mod:`~captum_legrad.eval.datasets`: ``gtsegs_ijcv.mat`` and OpenImagesV7 point labels.
- :mod:`~captum_legrad.eval.distributed`: sharding and reduction under ``torchrun``.

The ``captum-legrad eval`` command (:mod:`captum_legrad.cli`) puts these together.
"""

from .harness import (
    METHOD_NAMES,
    METHODS,
    EvalBatch,
    EvalConfig,
    EvalOutcome,
    build_methods,
    evaluate_batch,
    evaluate_batches,
    summarize,
)
from .metrics import (
    MetricSums,
    area_under_curve,
    average_precision,
    binarize,
    perturbation_curve,
    pixel_ap,
    point_counts,
    pointing_game,
    segmentation_counts,
)

__all__ = [
    "METHOD_NAMES",
    "METHODS",
    "EvalBatch",
    "EvalConfig",
    "EvalOutcome",
    "build_methods",
    "evaluate_batch",
    "evaluate_batches",
    "summarize",
    "MetricSums",
    "area_under_curve",
    "average_precision",
    "binarize",
    "perturbation_curve",
    "pixel_ap",
    "point_counts",
    "pointing_game",
    "segmentation_counts",
]
