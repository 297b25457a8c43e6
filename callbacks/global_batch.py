"""Gradient accumulation that keeps a global batch size whatever the number of processes: set on the
trainer at setup, once Lightning knows how many processes there are (as Lightning's own
``GradientAccumulationScheduler`` sets it)."""

from __future__ import annotations

import lightning as L


def accumulation(global_batch_size: int, batch_size: int, world_size: int) -> int:
    """Batches per optimizer step; ValueError when ``global_batch_size`` is not a multiple of
    ``batch_size`` x ``world_size``."""
    per_step = batch_size * world_size
    if global_batch_size % per_step:
        raise ValueError(
            f"data.global_batch_size={global_batch_size} is not a multiple of data.batch_size x "
            f"processes = {batch_size} x {world_size} = {per_step}"
        )
    return global_batch_size // per_step


class GlobalBatch(L.Callback):
    """Accumulates gradients over as many batches as make ``global_batch_size`` across the processes."""

    def __init__(self, global_batch_size: int, batch_size: int) -> None:
        self.global_batch_size, self.batch_size = global_batch_size, batch_size

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        trainer.accumulate_grad_batches = accumulation(
            self.global_batch_size, self.batch_size, trainer.world_size
        )
