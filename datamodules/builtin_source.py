"""The built-in dataset as a DataSource, plus the constant-segment prior that gives results context."""

from __future__ import annotations

import torch

from datamodules.builtin import BuiltinFeatureStore, BuiltinSpec, builtin_records
from datamodules.records import GroundingRecord
from metrics.prior import best_constant_segment, constant_segment_scores


class BuiltinSource:
    name = "builtin"

    def __init__(self, **spec: object) -> None:
        self.spec = BuiltinSpec(**spec)  # type: ignore[arg-type]
        self.num_frames, self.feature_dim = self.spec.num_frames, self.spec.feature_dim
        self._records: dict[str, list[GroundingRecord]] = {}

    def records(self, split: str) -> list[GroundingRecord]:
        if split not in self._records:
            self._records[split] = builtin_records(self.spec, split)
        return self._records[split]

    def store(self, split: str) -> BuiltinFeatureStore:
        return BuiltinFeatureStore(self.spec, split)


def normalized_segments(records: list[GroundingRecord]) -> torch.Tensor:
    return torch.tensor([[r.start / r.duration, r.end / r.duration] for r in records], dtype=torch.float64)


def prior_scores(train: list[GroundingRecord], test: list[GroundingRecord]) -> dict[str, float]:
    """Scores of the best constant segment fitted on ``train``, evaluated on ``test``."""
    segment = best_constant_segment(normalized_segments(train))
    return constant_segment_scores(segment, normalized_segments(test))
