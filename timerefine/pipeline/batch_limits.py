"""``trainer.limit_*_batches`` fractions that leave a loop no batch: Lightning finds them only when
that loop starts, after the run's config is written; here they are found before anything is."""

from __future__ import annotations

import math
from collections.abc import Iterator

import lightning as L

from datamodules.datamodule import GroundingDataModule


def empty_loops(
    trainer: L.Trainer, datamodule: GroundingDataModule, loops: tuple[str, ...] = ("train", "val", "test")
) -> Iterator[str]:
    """A line per ``limit_<loop>_batches`` fraction under one batch of its split on each process."""
    data = datamodule.data
    sizes = {"train": data.batch_size, "val": data.eval_batch_size, "test": data.eval_batch_size}
    for loop, batch_size in ((loop, sizes[loop]) for loop in loops):
        limit = getattr(trainer, f"limit_{loop}_batches")
        if not isinstance(limit, float) or limit <= 0:
            continue
        per_process = math.ceil(len(datamodule.records(loop)) / trainer.world_size)
        batches = math.ceil(per_process / batch_size)
        if int(batches * limit) == 0:
            yield (
                f"trainer.limit_{loop}_batches={limit}: {limit} of the {batches} {loop} batches per "
                f"process is none; use at least {1 / batches:.3g}, or a whole number of batches"
            )
