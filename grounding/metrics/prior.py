"""The best constant-segment baseline: one normalized [start, end] fitted on train, scored on test."""

from __future__ import annotations

import torch

from grounding.metrics.grounding import segment_scores
from grounding.metrics.iou import temporal_iou
from grounding.metrics.protocols import EXACT, Protocol
from grounding.records import GroundingRecord


def best_constant_segment(train: torch.Tensor, grid: int = 50) -> tuple[float, float]:
    """The normalized segment on a ``grid`` lattice with the highest mean IoU over ``train`` (N, 2)."""
    ticks = torch.linspace(0.0, 1.0, grid + 1, dtype=torch.float64)
    starts, ends = torch.meshgrid(ticks, ticks, indexing="ij")
    keep = starts < ends
    candidates = torch.stack([starts[keep], ends[keep]], dim=1)
    best, best_score = (0.0, 1.0), -1.0
    for candidate in candidates:
        score = float(temporal_iou(candidate.expand(len(train), 2), train).mean())
        if score > best_score:
            best, best_score = (float(candidate[0]), float(candidate[1])), score
    return best


def normalized_segments(records: list[GroundingRecord]) -> torch.Tensor:
    return torch.tensor([[r.start / r.duration, r.end / r.duration] for r in records], dtype=torch.float64)


def prior_scores(
    train: list[GroundingRecord], test: list[GroundingRecord], protocol: Protocol = EXACT
) -> dict[str, float]:
    """Scores of the best constant segment fitted on ``train`` (target windows), evaluated on ``test``
    as the model is (each query's windows by its ``multi_window`` rule, under ``protocol``)."""
    start, end = best_constant_segment(normalized_segments(train))
    return segment_scores([(start * r.duration, end * r.duration) for r in test], test, protocol)
