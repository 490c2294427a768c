"""Metrics on hand-made maps with answers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from captum_legrad.eval.metrics import (
    DEFAULT_FRACTIONS,
    MetricSums,
    area_under_curve,
    average_precision,
    binarize,
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

#: 2x2 map whose min-max normalisation is [[0, 0.25], [0.5, 1]].
MAP = torch.tensor([[[0.0, 1.0], [2.0, 4.0]]])
#: Object = the bottom row.
MASK = torch.tensor([[[False, False], [True, True]]])


def test_pointing_game_hit_miss_and_tolerance() -> None:
    heat = torch.zeros(3, 5, 5)
    heat[:, 2, 3] = 1.0
    masks = torch.zeros(3, 5, 5, dtype=torch.bool)
    masks[0, 2, 3] = True  # on the peak
    masks[1, 0, 0] = True  # far away
    masks[2, 2, 4] = True  # next to the peak
    assert pointing_game(heat, masks).tolist() == [True, False, False]
    assert pointing_game(heat, masks, tolerance=1).tolist() == [True, False, True]
    # (0, 0) is sqrt(2² + 3²) = 3.6 pixels from the peak at (2, 3)
    assert pointing_game(heat, masks, tolerance=3).tolist() == [True, False, True]
    assert pointing_game(heat, masks, tolerance=4).tolist() == [True, True, True]


def test_pointing_game_constant_map_points_at_first_pixel() -> None:
    masks = torch.zeros(2, 3, 3, dtype=torch.bool)
    masks[0, 0, 0] = True
    masks[1, 1, 1] = True
    assert pointing_game(torch.zeros(2, 3, 3), masks).tolist() == [True, False]


def test_binarize_at_half_and_at_mean() -> None:
    assert binarize(MAP, 0.5).tolist() == [[[False, False], [False, True]]]
    # mean of the normalised map = (0 + 0.25 + 0.5 + 1) / 4 = 0.4375
    assert binarize(MAP, "mean").tolist() == [[[False, False], [True, True]]]
    assert not binarize(torch.full((1, 2, 2), 3.0)).any()  # constant map: all background
    with pytest.raises(ValueError, match="mean"):
        binarize(MAP, "median")


def test_segmentation_counts_by_hand() -> None:
    counts = segmentation_counts(MAP, MASK, 0.5)
    # predicted foreground = {(1, 1)}; truth = {(1, 0), (1, 1)}
    assert counts["intersection"].tolist() == [[2.0, 1.0]]  # background, foreground
    assert counts["union"].tolist() == [[3.0, 2.0]]
    assert counts["correct"].tolist() == [3.0]
    assert counts["labeled"].tolist() == [4.0]
    iou = counts["intersection"].sum(0) / counts["union"].sum(0)
    assert float(iou.mean()) == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_segmentation_counts_perfect_and_inverted() -> None:
    perfect = segmentation_counts(MASK.float(), MASK)
    assert perfect["intersection"].tolist() == perfect["union"].tolist() == [[2.0, 2.0]]
    inverted = segmentation_counts((~MASK).float(), MASK)
    assert inverted["intersection"].tolist() == [[0.0, 0.0]]
    assert inverted["correct"].tolist() == [0.0]


def test_average_precision_known_values() -> None:
    ap = average_precision
    # precision 1 at recall 0.5, 2/3 at recall 1
    assert float(ap(torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([1, 0, 1, 0]))) == (
        pytest.approx(0.5 + 0.5 * 2 / 3)
    )
    assert float(ap(torch.tensor([0.1, 0.9, 0.8]), torch.tensor([0, 1, 1]))) == 1.0
    # tied scores enter together: one threshold, precision 1/2
    assert float(ap(torch.full((4,), 0.3), torch.tensor([1, 0, 1, 0]))) == pytest.approx(0.5)
    # a tie across a positive and a negative: thresholds 0.9 (P=1, R=.5), 0.5 (P=2/3, R=1)
    assert float(ap(torch.tensor([0.9, 0.5, 0.5, 0.1]), torch.tensor([1, 1, 0, 0]))) == (
        pytest.approx(0.5 + 0.5 * 2 / 3)
    )
    assert math.isnan(float(ap(torch.rand(5), torch.zeros(5))))


def test_pixel_ap_per_map_and_two_class() -> None:
    maps = torch.stack([MAP[0], -MAP[0]])
    masks = torch.cat([MASK, MASK])
    values = pixel_ap(maps, masks)
    # map 0 ranks (1,1), (1,0) first: AP 1; map 1 ranks them last: P=1/3 at R=.5, 1/2 at R=1
    assert values.tolist() == pytest.approx([1.0, 0.5 * (1 / 3) + 0.5 * (2 / 4)])
    two = pixel_ap(MASK.float(), MASK, two_class=True)
    assert two.tolist() == [1.0]
    assert math.isnan(float(pixel_ap(MAP, torch.zeros_like(MASK))[0]))


def test_point_counts_by_hand() -> None:
    heat = torch.zeros(4, 4)
    heat[:2, :2] = 1.0  # foreground: top-left 2x2
    points = torch.tensor([[0.5, 0.5], [3.5, 3.5], [1.5, 0.5], [3.5, 0.5]])  # (x, y)
    positive = torch.tensor([True, True, False, False])
    # TP: (0.5, 0.5); FN: (3.5, 3.5); FP: (1.5, 0.5); (3.5, 0.5) is a true negative
    assert point_counts(heat, points, positive).tolist() == [1.0, 1.0, 1.0]


class PatchModel(torch.nn.Module):
    """Class 0 wins while the top-left 2x2 patch keeps more than half its mass."""

    def forward(self, x: Tensor) -> Tensor:
        top_left = x[:, :, :2, :2].sum(dim=(1, 2, 3))
        return torch.stack([top_left - 2.0, torch.zeros_like(top_left)], dim=1)


def test_perturbation_curves_by_hand() -> None:
    images = torch.ones(1, 1, 4, 4)
    heat = torch.tensor([[4.0, 4.0, 3.0, 3.0], [4.0, 4.0, 3.0, 3.0]])
    heat = torch.cat([heat, heat - 2.0])[None]  # patches: TL 4, TR 3, BL 2, BR 1
    target = torch.tensor([0])
    fractions = (0.0, 0.25, 0.5, 0.75)
    (positive,) = perturbation_curve(
        PatchModel(), images, heat, target, patch_size=(2, 2), mode="positive", fractions=fractions
    )
    (negative,) = perturbation_curve(
        PatchModel(), images, heat, target, patch_size=(2, 2), mode="negative", fractions=fractions
    )
    assert positive.tolist() == [[1.0, 0.0, 0.0, 0.0]]  # the top-left patch goes first
    assert negative.tolist() == [[1.0, 1.0, 1.0, 1.0]]  # BR, BL, TR go first
    assert float(area_under_curve(positive, fractions)) == pytest.approx(0.125)
    assert float(area_under_curve(negative, fractions)) == pytest.approx(0.75)


def test_perturbation_baseline_and_probabilities() -> None:
    images = torch.ones(1, 1, 4, 4)
    heat = torch.arange(16.0).view(1, 4, 4).flip(-1).flip(-2)  # top-left most relevant
    accuracy, probability = perturbation_curve(
        PatchModel(),
        images,
        heat,
        torch.tensor([0]),
        patch_size=(2, 2),
        fractions=(0.0, 0.25),
        baseline=0.5,  # removed top-left keeps a mass of 2: logit 0, a tie
        scores=(top1_correct, softmax_probability),
    )
    assert accuracy.tolist() == [[1.0, 1.0]]  # arg-max of a tie is class 0
    assert probability[0].tolist() == pytest.approx([1 / (1 + math.exp(-2.0)), 0.5])
    with pytest.raises(ValueError, match="positive"):
        perturbation_curve(
            PatchModel(), images, heat, torch.tensor([0]), patch_size=(2, 2), mode="both"
        )


def test_score_functions() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 1.0, 0.0]])
    target = torch.tensor([2, 1])
    assert top1_correct(logits, target).tolist() == [0.0, 1.0]
    assert multilabel_correct(logits, target).tolist() == [1.0, 1.0]
    assert sigmoid_probability(logits, target).tolist() == pytest.approx(
        [1 / (1 + math.exp(-0.5)), 1 / (1 + math.exp(-1.0))]
    )
    assert softmax_probability(logits, target).sum() < 2.0


def test_area_under_constant_curve() -> None:
    assert float(area_under_curve(torch.ones(len(DEFAULT_FRACTIONS)))) == pytest.approx(0.9)
    assert DEFAULT_FRACTIONS[0] == 0.0 and DEFAULT_FRACTIONS[-1] == pytest.approx(0.9)


def test_metric_sums_add_up() -> None:
    sums = MetricSums.zeros({"hits": (), "curve": (3,)})
    sums.add("hits", 2)
    sums.add("hits", torch.tensor(1.0))
    sums.add("curve", torch.tensor([1.0, 2.0, 3.0]))
    sums.all_reduce()  # no process group: unchanged
    assert float(sums["hits"]) == 3.0
    assert sums["curve"].dtype == torch.float64
    assert sums["curve"].tolist() == [1.0, 2.0, 3.0]
    assert list(sums.names()) == ["curve", "hits"]
