"""Samplers that shard by rank without padding and tag every index with its epoch.

Evaluation sees every query exactly once across processes (no duplicated padding samples).
Training reshuffles each epoch from ``(seed, epoch)`` and can start mid-epoch after a resume.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ShardedEpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)`` for this rank's share: ``order[rank::world_size]``, never padded."""

    def __init__(
        self, size: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1, skip: int = 0
    ) -> None:
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.skip = 0, skip

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning each epoch; a pending resume skip applies only to its own epoch."""
        if epoch != self.epoch:
            self.skip = 0
        self.epoch = epoch

    def _shard(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        shard = self._shard()[self.skip :]
        self.skip = 0
        return iter([(self.epoch, index) for index in shard])

    def __len__(self) -> int:
        # The full shard, even with a pending skip: Lightning reads the length once and keeps it as
        # every epoch's batch count, and after a resume it counts the skipped batches as done.
        return len(range(self.rank, self.size, self.world_size))
