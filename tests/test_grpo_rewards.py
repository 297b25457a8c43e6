"""The GRPO rewards (grounding/metrics/rewards.py) on hand-computed cases."""

from __future__ import annotations

import pytest

from grounding.metrics.rewards import REWARDS, Answer, total_reward
from grounding.records import GroundingRecord

RECORD = GroundingRecord("q", "v", "a query", duration=100.0, start=20.0, end=40.0)


def reward(name: str, *steps: tuple[float, float], expected: int = 3, bonus: float = 0.0) -> float:
    return REWARDS[name](Answer(tuple(steps), expected), RECORD, bonus)


def test_iou_is_the_final_segments():
    assert reward("iou", (0.0, 10.0), (25.0, 45.0)) == pytest.approx(15 / 25)
    assert reward("iou") == 0.0  # nothing parsed


def test_time_r1_scales_the_iou_by_both_boundary_errors():
    # IoU 15/25, start off by 5 s, end by 5 s of 100 s: 0.6 * 0.95 * 0.95
    assert reward("time_r1", (25.0, 45.0)) == pytest.approx(0.6 * 0.95 * 0.95)
    assert reward("time_r1", (20.0, 40.0)) == pytest.approx(1.0)
    assert reward("time_r1", (60.0, 80.0)) == 0.0  # no overlap
    # Unclipped answers (inference.order_and_clip=false) may leave the video; an error past its length
    # takes the factor to 0. Before: (20, 150) scored -0.015 (worse than a miss), (-90, 150) +0.0008.
    assert reward("time_r1", (20.0, 150.0)) == 0.0 and reward("time_r1", (-90.0, 150.0)) == 0.0


def test_refine_gain_adds_the_bonus_per_step_that_raised_the_iou():
    # IoUs 0, 15/25, 10/30 (worse), 1: two steps raised it (0 -> 0.6, 1/3 -> 1)
    steps = [(50.0, 60.0), (25.0, 45.0), (10.0, 30.0), (20.0, 40.0)]
    assert reward("refine_gain", *steps, bonus=0.1) == pytest.approx(1.0 + 2 * 0.1)
    assert reward("refine_gain", *steps, bonus=0.0) == pytest.approx(1.0)
    assert reward("refine_gain", (20.0, 40.0), (20.0, 40.0), bonus=0.5) == pytest.approx(
        1.0
    )  # equal: no gain


def test_format_asks_for_every_segment_of_the_layout():
    assert reward("format", (0.0, 1.0), (0.0, 1.0), expected=2) == 1.0
    assert reward("format", (0.0, 1.0), expected=2) == 0.0


def test_rewards_sum():
    answer = Answer(((20.0, 40.0),), 1)
    assert total_reward(["iou", "format"], answer, RECORD, 0.0) == pytest.approx(2.0)
