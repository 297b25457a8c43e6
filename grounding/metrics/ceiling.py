"""The best scores a timeline allows: every ground truth written as frame indices and read back."""

from __future__ import annotations

import torch

from grounding.answer_format.timeline import Timeline
from grounding.metrics.protocols import EXACT, Protocol, protocol_scores, protocol_sums
from grounding.records import GroundingRecord


def timeline_ceiling(
    records: list[GroundingRecord], timeline: Timeline, protocol: Protocol = EXACT
) -> dict[str, float]:
    """R1@m and mIoU (percent) of perfect index answers on ``timeline``: below 100 wherever the
    indices cannot hold the ground truth exactly."""

    def written(t: float, duration: float) -> float:
        return timeline.to_seconds(timeline.to_index(t, duration), duration)

    pred = torch.tensor(
        [[written(r.start, r.duration), written(r.end, r.duration)] for r in records], dtype=torch.float64
    )
    gt = torch.tensor([[r.start, r.end] for r in records], dtype=torch.float64)
    duration = torch.tensor([r.duration for r in records], dtype=torch.float64)
    return protocol_scores(protocol_sums(pred, gt, duration, protocol), protocol)
