"""Loggers that continue the same run after a resume, and the scores after a fit kept out of them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only

from callbacks.lightning_compat import ContinuingCSVLogger


@contextmanager
def unlogged(trainer: L.Trainer) -> Iterator[None]:
    """``trainer`` without its loggers: the best checkpoint's scores after a fit go to metrics.json, not
    into the curves at the last step, where they would read as the last step's model's."""
    loggers, trainer.loggers = trainer.loggers, []
    try:
        yield
    finally:
        trainer.loggers = loggers


class ResumableCSVLogger(ContinuingCSVLogger):
    """Continues metrics.csv after a resume. Every row is written as it is logged (also those that
    bypass Lightning's flushing, like the learning-rate monitor's), so a killed run has written every
    row it logged before its checkpoint; :class:`CSVResume` removes those it logged after it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, flush_logs_every_n_steps=1, **kwargs)

    @rank_zero_only
    def resume_at(self, step: int) -> None:
        """The run continues from a checkpoint at global step ``step``: the rows logged at that step or
        later were written by a killed run after the checkpoint, and the resumed run logs them again.
        (Rows of step ``step - 1``, its last trained batch and the validation after it, stay.)"""
        self.experiment.drop_from(step)


class CSVResume(L.Callback):
    """Tells the :class:`ResumableCSVLogger` where a fit continues: at a resumed checkpoint's step, or
    at step 0 for a fit without one (an earlier attempt in the same folder, killed before its first
    checkpoint, leaves no rows)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path is None:
            for logger in trainer.loggers:
                if isinstance(logger, ResumableCSVLogger):
                    logger.resume_at(0)

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.state.fn != TrainerFn.FITTING:  # validate/test load the best checkpoint too
            return
        for logger in trainer.loggers:
            if isinstance(logger, ResumableCSVLogger):
                logger.resume_at(checkpoint["global_step"])
