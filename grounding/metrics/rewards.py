"""Rewards of a sampled answer for reinforcement fine-tuning (GRPO), by name in ``REWARDS``.

Each reward is a pure function of one :class:`Answer` (its segments in seconds along the refinement
path, the last one final) and the query's record (and a ``bonus`` that only ``refine_gain`` reads):

- ``iou``: the final segment's IoU (TimeZero).
- ``time_r1``: IoU x (1 - |Δstart| / T) x (1 - |Δend| / T), T the video's duration (Time-R1).
- ``refine_gain``: the final IoU plus ``bonus`` for each refinement step whose IoU is higher than the
  step before (the chain is rewarded for refining, not only for its last answer). It pays for a poor
  first segment that is then corrected, more than for one right from the start (docs/grpo.md).
- ``format``: 1 when the answer parsed into every segment its layout has, else 0 (free decoding).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

from grounding.metrics.windows import Segment, record_iou
from grounding.records import GroundingRecord


@dataclass(frozen=True)
class Answer:
    """``steps``: the segments in seconds (first coarse, then each refined one), fewer than
    ``expected`` (how many the answer layout has) when the answer did not parse whole."""

    steps: tuple[Segment, ...]
    expected: int

    @property
    def final(self) -> Segment:
        return self.steps[-1] if self.steps else (math.nan, math.nan)


Reward = Callable[[Answer, GroundingRecord, float], float]  # (answer, record, bonus) -> reward


def iou_reward(answer: Answer, record: GroundingRecord, bonus: float = 0.0) -> float:
    return record_iou(answer.final, record)


def time_r1_reward(answer: Answer, record: GroundingRecord, bonus: float = 0.0) -> float:
    start, end = answer.final
    if math.isnan(start) or math.isnan(end):
        return 0.0
    near_start = max(0.0, 1 - abs(start - record.start) / record.duration)  # 0 past the video's length:
    near_end = max(0.0, 1 - abs(end - record.end) / record.duration)  # an unclipped answer may leave it
    return record_iou(answer.final, record) * near_start * near_end


def refine_gain_reward(answer: Answer, record: GroundingRecord, bonus: float = 0.0) -> float:
    ious = [record_iou(step, record) for step in answer.steps]
    gains = sum(after > before for before, after in pairwise(ious))
    return (ious[-1] if ious else 0.0) + bonus * gains


def format_reward(answer: Answer, record: GroundingRecord, bonus: float = 0.0) -> float:
    return float(len(answer.steps) == answer.expected)


REWARDS: dict[str, Reward] = {
    "iou": iou_reward,
    "time_r1": time_r1_reward,
    "refine_gain": refine_gain_reward,
    "format": format_reward,
}


def total_reward(names: list[str], answer: Answer, record: GroundingRecord, bonus: float) -> float:
    """The sum of the named rewards (as TRL sums its reward functions)."""
    return sum(REWARDS[name](answer, record, bonus) for name in names)
