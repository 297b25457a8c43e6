"""The built-in dataset as a DataSource."""

from __future__ import annotations

from datamodules.builtin import BuiltinFeatureStore, BuiltinSpec, builtin_records
from grounding.records import EmptySplitError, GroundingRecord


class BuiltinSource:
    name = "builtin"

    def __init__(self, spec: BuiltinSpec) -> None:
        self.spec = spec
        self.num_frames, self.feature_dim = self.spec.num_frames, self.spec.feature_dim
        self._records: dict[str, list[GroundingRecord]] = {}

    def records(self, split: str) -> list[GroundingRecord]:
        if split not in self._records:
            self._records[split] = builtin_records(self.spec, split)
            if not self._records[split]:
                raise EmptySplitError(f"builtin {split}: no query (data.source.num_{split}=0)")
        return self._records[split]

    def annotations(self, split: str) -> list[GroundingRecord]:
        return self.records(split)

    def store(self, split: str) -> BuiltinFeatureStore:
        return BuiltinFeatureStore(self.spec, split)
