"""``trainer.limit_*_batches`` fractions that leave a loop no batch: Lightning finds them only when
that loop starts, after the run's config is written; here they are found before anything is. And an
epoch that ends on a partial gradient accumulation."""

from __future__ import annotations

import math
from collections.abc import Iterator

import lightning as L

from callbacks.global_batch import accumulation
from datamodules.datamodule import GroundingDataModule


def batches_per_process(trainer: L.Trainer, datamodule: GroundingDataModule, loop: str) -> int:
    """How many batches of ``loop``'s split each process takes in an epoch, before any limit (the most
    any takes: training shards are even, datamodules/sampling.py)."""
    data, queries = datamodule.data, len(datamodule.records(loop))
    if loop == "train":
        return math.ceil(queries // trainer.world_size / data.batch_size)
    return math.ceil(math.ceil(queries / trainer.world_size) / data.eval_batch_size)


def empty_loops(
    trainer: L.Trainer, datamodule: GroundingDataModule, loops: tuple[str, ...] = ("train", "val", "test")
) -> Iterator[str]:
    """A line per ``limit_<loop>_batches`` fraction under one batch of its split on each process, and for
    a train split smaller than the process count."""
    for loop in loops:
        if loop == "train" and (queries := len(datamodule.records(loop))) < trainer.world_size:
            yield f"the train split's {queries} queries leave some of the {trainer.world_size} processes none"
            continue
        limit = getattr(trainer, f"limit_{loop}_batches")
        if not isinstance(limit, float) or limit <= 0:
            continue
        batches = batches_per_process(trainer, datamodule, loop)
        if int(batches * limit) == 0:
            yield (
                f"trainer.limit_{loop}_batches={limit}: {limit} of the {batches} {loop} batches per "
                f"process is none; use at least {1 / batches:.3g}, or a whole number of batches"
            )


def partial_accumulation(trainer: L.Trainer, datamodule: GroundingDataModule) -> str | None:
    """Why each epoch ends on fewer batches than a step accumulates (``data.global_batch_size``, or
    ``trainer.accumulate_grad_batches``), which Lightning steps on with a smaller batch, so that
    validations fall off the optimizer-step grid; None when the epoch divides (or nothing accumulates)."""
    data = datamodule.data
    if data.global_batch_size:
        per_step = accumulation(data.global_batch_size, data.batch_size, trainer.world_size)
        key = f"data.global_batch_size={data.global_batch_size}"
    else:
        per_step = trainer.accumulate_grad_batches
        key = f"trainer.accumulate_grad_batches={per_step}"
    if per_step == 1:
        return None
    batches = batches_per_process(trainer, datamodule, "train")
    limit = trainer.limit_train_batches
    batches = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
    if batches % per_step == 0:
        return None
    return (
        f"{key}: an epoch is {batches} batches per process, "
        f"{batches % per_step} past a multiple of the {per_step} a step accumulates; Lightning steps on "
        "those with a smaller batch, and validations then fall off the optimizer-step grid"
    )
