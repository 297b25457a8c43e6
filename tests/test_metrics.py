"""Temporal IoU, the grounding metric (R1@m, mIoU, parse failures), and the constant-segment prior."""

from __future__ import annotations

import math

import pytest
import torch

from grounding.metrics.grounding import GroundingMetric
from grounding.metrics.iou import temporal_iou
from grounding.metrics.prior import best_constant_segment

NAN = math.nan


def iou(pred, target) -> float:
    return float(temporal_iou(torch.tensor([pred], dtype=torch.float64), torch.tensor([target]))[0])


@pytest.mark.parametrize(
    ("pred", "target", "expected"),
    [
        ((2.0, 5.0), (2.0, 5.0), 1.0),  # identical
        ((0.0, 1.0), (2.0, 3.0), 0.0),  # disjoint
        ((0.0, 2.0), (2.0, 4.0), 0.0),  # touching
        ((3.0, 4.0), (2.0, 6.0), 0.25),  # contained
        ((2.0, 6.0), (3.0, 4.0), 0.25),  # containing
        ((0.0, 4.0), (2.0, 6.0), 2 / 6),  # partial overlap
        ((3.0, 3.0), (2.0, 6.0), 0.0),  # zero-length prediction inside the target
        ((2.0, 6.0), (3.0, 3.0), 0.0),  # zero-length target inside the prediction
        ((3.0, 3.0), (3.0, 3.0), 1.0),  # the same point
        ((3.0, 3.0), (4.0, 4.0), 0.0),  # different points
        ((NAN, NAN), (2.0, 6.0), 0.0),  # unparseable prediction
        ((NAN, 4.0), (2.0, 6.0), 0.0),
    ],
)
def test_temporal_iou_edge_cases(pred, target, expected):
    assert iou(pred, target) == pytest.approx(expected)
    if not any(map(math.isnan, pred)):
        assert iou(target, pred) == pytest.approx(expected)  # symmetric


def test_temporal_iou_is_rowwise_and_bounded():
    torch.manual_seed(0)
    a = torch.rand(200, 2).sort(dim=1).values
    b = torch.rand(200, 2).sort(dim=1).values
    values = temporal_iou(a, b)
    assert values.shape == (200,) and values.dtype == torch.float64
    assert ((values >= 0) & (values <= 1)).all()
    assert torch.allclose(values[7:9], temporal_iou(a[7:9], b[7:9]))
    assert torch.allclose(temporal_iou(a, a), torch.ones(200, dtype=torch.float64))


def scores(pred, target) -> dict[str, float]:
    metric = GroundingMetric()
    metric.update(torch.tensor(pred, dtype=torch.float64), torch.tensor(target, dtype=torch.float64))
    return metric.compute()


def test_grounding_metric_hand_computed():
    # IoUs: 1.0, 0.6, 0.4, 0.0 (disjoint), 0.0 (unparseable)
    pred = [[0, 10], [0, 6], [0, 4], [20, 30], [NAN, NAN]]
    target = [[0, 10], [0, 10], [0, 10], [0, 10], [0, 10]]
    result = scores(pred, target)
    assert result["R1@0.3"] == pytest.approx(60.0)
    assert result["R1@0.5"] == pytest.approx(40.0)
    assert result["R1@0.7"] == pytest.approx(20.0)
    assert result["mIoU"] == pytest.approx(100 * (1.0 + 0.6 + 0.4) / 5)
    assert result["parse_fail"] == pytest.approx(20.0)
    assert result["count"] == 5


def test_parse_fail_counts_texts_that_did_not_parse_whatever_answers_them():
    """Before: with the aux head answering (``inference.final=aux``), only answers without any
    <OFFSET> counted, so a run whose every text was garbage showed parse_fail 14."""
    metric = GroundingMetric()
    pred = torch.tensor([[0.0, 10.0], [0.0, 5.0], [NAN, NAN]], dtype=torch.float64)
    target = torch.tensor([[0.0, 10.0]] * 3, dtype=torch.float64)
    metric.update(pred, target, unparsed=torch.tensor([False, True, True]))  # row 2: the aux head's
    result = metric.compute()
    assert result["parse_fail"] == pytest.approx(200 / 3)
    assert result["mIoU"] == pytest.approx(100 * (1.0 + 0.5) / 3)


def test_thresholds_are_inclusive():
    result = scores([[0, 5], [0, 3], [0, 7]], [[0, 10]] * 3)
    assert (result["R1@0.3"], result["R1@0.5"], result["R1@0.7"]) == pytest.approx((100.0, 200 / 3, 100 / 3))


def test_empty_metric_is_zero():
    result = GroundingMetric().compute()
    assert result["mIoU"] == 0.0 and result["parse_fail"] == 0.0 and result["count"] == 0.0
    assert all(result[f"R1@{t}"] == 0.0 for t in (0.3, 0.5, 0.7))


def test_accumulation_equals_one_update_on_the_concatenation():
    torch.manual_seed(1)
    pred = torch.rand(37, 2).sort(dim=1).values.double() * 30
    target = torch.rand(37, 2).sort(dim=1).values.double() * 30
    pred[[3, 17, 30]] = NAN
    pred[5] = target[5]
    whole = GroundingMetric()
    whole.update(pred, target)
    parts = GroundingMetric()
    for chunk in ((0, 5), (5, 6), (6, 20), (20, 37)):
        parts.update(pred[slice(*chunk)], target[slice(*chunk)])
    assert parts.compute() == pytest.approx(whole.compute())
    assert whole.compute()["parse_fail"] == pytest.approx(300 / 37)


def test_reset_clears_the_state():
    metric = GroundingMetric()
    metric.update(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 1.0]]))
    assert metric.compute()["mIoU"] == pytest.approx(100.0)
    metric.reset()
    metric.update(torch.tensor([[5.0, 6.0]]), torch.tensor([[0.0, 1.0]]))
    assert metric.compute()["mIoU"] == 0.0 and metric.compute()["count"] == 1


def mean_iou(segment: tuple[float, float], target: torch.Tensor) -> float:
    """Percent mean IoU of always answering ``segment``."""
    return 100 * float(
        temporal_iou(torch.tensor([segment], dtype=torch.float64).expand(len(target), 2), target).mean()
    )


def test_best_constant_segment_finds_the_known_optimum():
    train = torch.tensor([[0.2, 0.6]] * 10, dtype=torch.float64)
    segment = best_constant_segment(train)
    assert segment == pytest.approx((0.2, 0.6))
    assert mean_iou(segment, train) == pytest.approx(100.0)


def test_best_constant_segment_is_a_grid_maximum():
    torch.manual_seed(2)
    train = torch.rand(60, 2).sort(dim=1).values.double()
    grid = 10
    best = best_constant_segment(train, grid=grid)
    best_score = mean_iou(best, train)
    ticks = [i / grid for i in range(grid + 1)]
    for s in ticks:
        for e in ticks:
            if s < e:
                assert mean_iou((s, e), train) <= best_score + 1e-9
    # Two clusters, 7 vs 3 queries: the best constant is the bigger one.
    data = torch.tensor([[0.0, 0.3]] * 7 + [[0.7, 1.0]] * 3, dtype=torch.float64)
    assert best_constant_segment(data, grid=10) == pytest.approx((0.0, 0.3))
