"""``last.ckpt``: the resume point, written every n steps, at the final step, and on a crash."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class LastCheckpoint(ModelCheckpoint):
    """Written where Lightning resumes exactly: at the end of the step's batch, or, when validation
    follows that batch, at the end of the validation (resuming from before it, Lightning would skip
    it). Always inside the training loop, also at ``max_steps``: a checkpoint written after ``fit``
    returns would restore a finished-epoch loop state."""

    def __init__(self, dirpath: str, every_n_train_steps: int) -> None:
        super().__init__(
            dirpath=dirpath,
            save_top_k=0,
            save_last=True,
            every_n_train_steps=every_n_train_steps,
            save_on_exception=True,
        )
        self._after_validation = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_global_step_saved = trainer.global_step  # a resumed run starts at its checkpoint

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        every = self._every_n_train_steps
        due = (every > 0 and trainer.global_step % every == 0) or trainer.global_step == trainer.max_steps
        if not due or self._should_skip_saving_checkpoint(trainer):
            return
        if trainer.fit_loop.epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher):
            self._after_validation = True
        else:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._after_validation and not trainer.sanity_checking:
            self._after_validation = False
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
