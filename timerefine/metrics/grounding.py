"""torchmetrics wrappers: sum states reduced with ``sum``, so results are exact under DDP."""

from __future__ import annotations

import torch
from torchmetrics import Metric

from timerefine.metrics.iou import THRESHOLDS, grounding_scores, grounding_sums, temporal_iou


class GroundingMetric(Metric):
    """R1@{0.3,0.5,0.7}, mIoU and the parse-failure rate over every query seen.

    ``update`` takes predictions with ``NaN`` rows for answers that did not parse; they count
    as IoU 0 and as parse failures.
    """

    full_state_update = False

    def __init__(self, thresholds: tuple[float, ...] = THRESHOLDS) -> None:
        super().__init__()
        self.thresholds = thresholds
        for name in ("iou", "count", "failed", *(f"R1@{t}" for t in thresholds)):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor, iou: torch.Tensor | None = None) -> None:
        """``iou``: each row's IoU when it is not the one with ``target`` (queries with several windows)."""
        sums = grounding_sums(temporal_iou(pred, target) if iou is None else iou, self.thresholds)
        for name, value in sums.items():
            setattr(self, name, getattr(self, name) + value.to(self.device))
        self.failed += torch.isnan(pred).any(dim=1).sum().double()

    def compute(self) -> dict[str, float]:
        sums = {name: getattr(self, name) for name in ("iou", "count", *(f"R1@{t}" for t in self.thresholds))}
        scores = grounding_scores(sums)
        scores["parse_fail"] = 100.0 * float(self.failed) / float(self.count) if float(self.count) else 0.0
        scores["count"] = float(self.count)
        return scores
