"""A map-style dataset of grounding records and their features, indexed by ``(epoch, index)``."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from grounding.records import FeatureError, FeatureStore, GroundingRecord


class GroundingDataset(Dataset):
    """Returns one record with its ``(num_frames, dim)`` features; bad features raise FeatureError."""

    def __init__(self, records: list[GroundingRecord], store: FeatureStore) -> None:
        self.records, self.store = records, store

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        record = self.records[index]
        with np.errstate(over="ignore"):  # a value beyond float32's range becomes inf: refused below
            features = np.asarray(self.store.load(record.video_id), dtype=np.float32)
        expected = (self.store.num_frames, self.store.feature_dim)
        if features.shape != expected:
            self._broken_contract(record.video_id, f"expected shape {expected}, got {features.shape}")
        if not np.isfinite(features).all():
            self._broken_contract(record.video_id, "features contain NaN or inf")
        return {
            "record": record,
            "features": torch.from_numpy(features),
            "epoch": epoch,
            "index": index,
        }

    def _broken_contract(self, video_id: str, reason: str) -> None:
        """A store returned what it must not (stores check their own files): name the file."""
        raise FeatureError(video_id, self.store.source(video_id), reason)
