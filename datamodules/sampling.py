"""Samplers that shard by rank without padding and tag every index with its epoch, and the training
loader that checkpoints its place in the epoch.

Evaluation sees every query exactly once across processes (no duplicated padding samples), always
with the same targets. Training reshuffles each epoch from ``(seed, epoch)`` and continues mid-epoch
after a resume.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

log = logging.getLogger(__name__)


class ShardedEpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)`` for this rank's share: ``order[rank::world_size]``, never padded.
    ``even`` (training) leaves the order's last ``size % world_size`` indices out of the epoch, so that
    every rank takes as many batches of the same sizes: DDP ranks step together, and one with an extra
    batch waited for the others' gradients forever (a reshuffled epoch leaves out others)."""

    def __init__(
        self, size: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1, even: bool = False
    ) -> None:
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.used = size - size % world_size if even else size
        self.epoch, self.skip = 0, 0

    def resume(self, epoch: int, skip: int) -> None:
        """The next pass over ``epoch`` leaves out the first ``skip`` samples of this shard."""
        self.epoch, self.skip = epoch, skip

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
        return order[: self.used][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        shard = self._shard()[self.skip :]
        self.skip = 0
        return iter([(self.epoch, index) for index in shard])

    def __len__(self) -> int:
        # The full shard, even with a pending skip: Lightning reads the length once and keeps it as
        # every epoch's batch count, and after a resume it counts the skipped batches as done.
        return len(range(self.rank, self.used, self.world_size))


class EvaluationSampler(ShardedEpochSampler):
    """In order and tagged epoch 0 whatever the epoch: the targets behind ``val/loss`` and
    ``test/loss`` are the same at every evaluation and do not depend on the training loop's counters
    (which differ, for instance, in a run restarted from its final checkpoint)."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(size, False, rank=rank, world_size=world_size)

    def set_epoch(self, epoch: int) -> None:
        """Ignored (Lightning calls it on evaluation loaders too)."""


class ResumableLoader(DataLoader):
    """The training loader, whose place in the epoch Lightning keeps in checkpoints: it calls
    ``state_dict`` when saving and ``load_state_dict`` when resuming. The place is the epoch and the
    batches of it handed out; Lightning fetches no batch ahead from a loader with a length, so at a
    checkpoint these are the batches trained on.

    A pass starts lazily, at its first batch (after Lightning's ``set_epoch``, even with workers), and
    draws its worker seed from the loader's own generator: where a resumed run starts a pass, the
    global random state (dropout) stays as it was saved.
    """

    sampler: ShardedEpochSampler

    def __init__(self, dataset: Any, sampler: ShardedEpochSampler, **kwargs: Any) -> None:
        generator = torch.Generator().manual_seed(sampler.seed)
        super().__init__(dataset, sampler=sampler, generator=generator, **kwargs)
        self.place: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        self.place = {"epoch": self.sampler.epoch, "batches": self.sampler.skip // self.batch_size}
        for batch in super().__iter__():
            self.place["batches"] += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        if self.place is None:  # no pass yet: where the next one starts
            return {"epoch": self.sampler.epoch, "batches": self.sampler.skip // self.batch_size}
        return dict(self.place)

    def load_state_dict(self, state: dict[str, int]) -> None:
        log.info("resuming epoch %d after its first %d batches", state["epoch"], state["batches"])
        self.place = dict(state)
        self.sampler.resume(state["epoch"], state["batches"] * self.batch_size)
