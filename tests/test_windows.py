"""Scoring one predicted segment against several ground-truth windows (best-matching or union), and
the window the targets use."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from grounding.metrics.grounding import GroundingMetric
from grounding.metrics.iou import temporal_iou
from grounding.metrics.windows import (
    merged,
    metric_inputs,
    multi_window_iou,
    record_iou,
    segment_iou,
    target_window,
)
from grounding.records import GroundingRecord

TWO = [(0.0, 10.0), (20.0, 30.0)]


def plain_iou(pred, window) -> float:
    return float(
        temporal_iou(torch.tensor([pred], dtype=torch.float64), torch.tensor([window], dtype=torch.float64))[
            0
        ]
    )


@pytest.mark.parametrize(
    ("pred", "best", "union"),
    [
        ((20.0, 30.0), 1.0, 10 / 20),  # the second window: a perfect match, half of the union
        ((0.0, 30.0), 10 / 30, 20 / 30),  # spans both: |pred ∩ U| = 20, |pred ∪ U| = 30
        ((5.0, 25.0), 5 / 25, 10 / 30),  # 5 s of each window; |pred ∪ U| = 20 + 20 - 10
        ((12.0, 18.0), 0.0, 0.0),  # between the windows
        ((math.nan, math.nan), 0.0, 0.0),  # unparsed
    ],
)
def test_two_windows_by_hand(pred, best, union):
    assert multi_window_iou(pred, TWO, "best") == pytest.approx(best)
    assert multi_window_iou(pred, TWO, "union") == pytest.approx(union)


def test_overlapping_windows_count_once_in_the_union():
    assert merged([(5.0, 15.0), (0.0, 10.0), (15.0, 16.0)]) == [(0.0, 16.0)]
    assert multi_window_iou((0.0, 15.0), [(0.0, 10.0), (5.0, 15.0)], "union") == pytest.approx(1.0)
    assert multi_window_iou((0.0, 15.0), [(0.0, 10.0), (5.0, 15.0)], "best") == pytest.approx(10 / 15)


def test_point_prediction_on_a_point_window_scores_one():
    for mode in ("best", "union"):
        assert multi_window_iou((4.0, 4.0), [(4.0, 4.0), (6.0, 6.0)], mode) == 1.0
        assert multi_window_iou((5.0, 5.0), [(4.0, 4.0), (6.0, 6.0)], mode) == 0.0


segments = st.tuples(st.floats(0, 100), st.floats(0, 100)).map(lambda s: tuple(sorted(s)))


@given(segments, segments)
def test_segment_iou_is_the_metrics_temporal_iou(a, b):
    assert segment_iou(a, b) == pytest.approx(plain_iou(a, b), abs=1e-12)
    assert segment_iou((3.0, 3.0), (3.0, 3.0)) == plain_iou((3.0, 3.0), (3.0, 3.0)) == 1.0
    assert segment_iou((3.0, 3.0), (4.0, 4.0)) == plain_iou((3.0, 3.0), (4.0, 4.0)) == 0.0


@given(segments, segments)
def test_one_window_is_the_plain_iou_in_both_modes(pred, window):
    expected = plain_iou(pred, window)
    assert multi_window_iou(pred, [window], "best") == pytest.approx(expected, abs=1e-12)
    assert multi_window_iou(pred, [window], "union") == pytest.approx(expected, abs=1e-12)


@given(segments, st.lists(segments, min_size=1, max_size=4))
def test_scores_are_between_zero_and_one(pred, windows):
    for mode in ("best", "union"):
        assert 0.0 <= multi_window_iou(pred, windows, mode) <= 1.0 + 1e-12


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="multi_window must be one of"):
        multi_window_iou((0.0, 1.0), TWO, "mean")


def test_target_window():
    assert target_window([(20.0, 30.0), (0.0, 10.0)], "best") == (20.0, 30.0)  # the first window
    assert target_window(TWO, "union") == (0.0, 30.0)  # the span covers the union best (2/3)
    far = [(0.0, 2.0), (50.0, 60.0)]
    assert target_window(far, "union") == (50.0, 60.0)  # 10/12 of the union, the span only 12/60
    assert target_window([(3.0, 4.0)], "union") == (3.0, 4.0)


def record(windows, mode="best") -> GroundingRecord:
    start, end = target_window(windows, mode)
    return GroundingRecord("q", "v", "a query", 40.0, start, end, tuple(windows), mode)


def test_record_defaults_to_its_one_segment():
    single = GroundingRecord("q", "v", "a query", 40.0, 2.0, 5.0)
    assert single.windows == ((2.0, 5.0),) and single.multi_window == "best"
    assert record_iou((2.0, 5.0), single) == 1.0
    with pytest.raises(ValueError, match=r"segment \[30.0, 50.0\] is not inside \[0, 40.0\]"):
        GroundingRecord("q", "v", "a query", 40.0, 2.0, 5.0, ((2.0, 5.0), (30.0, 50.0)))


def test_metric_scores_each_query_by_its_windows():
    """What GroundingModule._evaluate feeds the metric: a prediction of the second window is a hit
    under best (R1@0.7 = 100) and half the union under union; a one-window query scores as before."""
    single = GroundingRecord("s", "v", "a query", 40.0, 0.0, 10.0)
    for mode, hit, miou in (("best", 100.0, 100.0), ("union", 50.0, 75.0)):
        metric = GroundingMetric()
        metric.update(*metric_inputs([(20.0, 30.0), (0.0, 10.0)], [record(TWO, mode), single]))
        scores = metric.compute()
        assert (scores["R1@0.7"], scores["mIoU"]) == (pytest.approx(hit), pytest.approx(miou))
