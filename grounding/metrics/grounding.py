"""torchmetrics wrappers: sum states reduced with ``sum``, so results are exact under DDP."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric

from grounding.metrics.iou import THRESHOLDS
from grounding.metrics.protocols import EXACT, Protocol, protocol_scores, protocol_sums
from grounding.metrics.windows import Segment, metric_inputs
from grounding.records import GroundingRecord


class GroundingMetric(Metric):
    """R1@{0.3,0.5,0.7}, mIoU and the parse-failure rate over every query seen, under ``protocol``
    (``eval.protocol``, see grounding/metrics/protocols.py).

    ``update`` takes predictions with ``NaN`` rows for missing answers, which count as IoU 0, and
    which texts did not parse (``parse_fail``): the same rows unless the aux head answers.
    """

    full_state_update = False

    def __init__(self, thresholds: tuple[float, ...] = THRESHOLDS, protocol: Protocol = EXACT) -> None:
        super().__init__()
        self.thresholds, self.protocol = thresholds, protocol
        for name in self._sum_names():
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def _sum_names(self) -> tuple[str, ...]:
        return ("iou", "count", "failed", "unparsed", *(f"R1@{t}" for t in self.thresholds))

    def update(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        duration: torch.Tensor | None = None,
        iou: torch.Tensor | None = None,
        unparsed: torch.Tensor | None = None,
        answered: torch.Tensor | None = None,
    ) -> None:
        """``pred``/``target`` ``(N, 2)`` in seconds; ``duration`` ``(N,)`` (needed by protocols on
        fractions of the duration); ``iou``: each row's IoU when it is not the one with ``target``
        (queries with several windows), rounded as the protocol says; ``unparsed`` ``(N,)``: the rows
        whose text did not parse (default: the NaN ones; the aux head may answer such a text);
        ``answered`` ``(N,)``: the rows whose query has an answer (default: the non-NaN ones), the
        denominator of ``parsed_only``."""
        if duration is None:
            if self.protocol.on_fractions and iou is None:
                raise ValueError(f"protocol {self.protocol.name} scores fractions: pass the durations")
            duration = torch.ones(len(pred), dtype=torch.float64)
        sums = protocol_sums(pred, target, duration, self.protocol, self.thresholds, iou, unparsed, answered)
        for name, value in sums.items():
            setattr(self, name, getattr(self, name) + value.to(self.device))

    def compute(self) -> dict[str, float]:
        return protocol_scores({name: getattr(self, name) for name in self._sum_names()}, self.protocol)


def segment_scores(
    segments: Sequence[Segment], records: Sequence[GroundingRecord], protocol: Protocol = EXACT
) -> dict[str, float]:
    """R1@m and mIoU of ``segments`` (seconds, one per record) as a run's answers are scored under
    ``protocol``: what a baseline is compared with a run by. Computed where it is called, never synced
    across processes (each has the same records)."""
    if not records:
        return {**{f"R1@{t}": 0.0 for t in THRESHOLDS}, "mIoU": 0.0}
    pred, target, duration, iou = metric_inputs(segments, records)
    scores = protocol_scores(protocol_sums(pred, target, duration, protocol, iou=iou), protocol)
    return {key: value for key, value in scores.items() if key.startswith("R1@") or key == "mIoU"}
