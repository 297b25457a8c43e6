"""Signals that stop training, acted on at a step boundary all ranks agree on: safe under DDP.

A signal handler that runs a collective (Lightning's SIGTERM notifier broadcasts; its SLURM handler
saves a checkpoint, which ends in a barrier) meets the other ranks at an arbitrary point, e.g. inside
a gradient all-reduce, and deadlocks them (Lightning-AI/pytorch-lightning#21406). Here a handler only
sets a flag. After each training batch outside an accumulation window the ranks agree (one
all-reduce) whether any of them got the signal; then, after the validation that follows the step if
one does, every rank has Lightning stop at the end of that step (its SIGTERMException, raised on every
rank at once). ``last.ckpt`` is saved where Lightning resumes exactly (after that validation, else at
the exception): the state an uninterrupted run has there.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import lightning as L

from callbacks.lightning_compat import (
    accumulating,
    notify_sigterm_with,
    stop_after_this_step,
    validation_follows_this_batch,
)


class StepBoundaryStop(L.Callback):
    """Stops the fit at the first step boundary after any rank set ``signalled``."""

    def __init__(self) -> None:
        self.signalled, self.stopping, self._after_validation = False, False, False

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signalled = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        """At the end of a step: half-way through an accumulation window, gradients live only in memory."""
        if self.stopping or accumulating(trainer):
            return
        if not trainer.strategy.reduce_boolean_decision(self.signalled, all=False):
            return
        self.stopping = True
        if validation_follows_this_batch(trainer):  # an uninterrupted run validates here: so does this one
            self._after_validation = True
        else:
            self.stop(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._after_validation and not trainer.sanity_checking:
            self._after_validation = False
            self.stop(trainer)

    def stop(self, trainer: L.Trainer) -> None:
        """Stop at the end of this step, on every rank."""
        stop_after_this_step(trainer)


class DistributedSigterm(StepBoundaryStop):
    """SIGTERM under DDP (one process keeps Lightning's own stop): the handler Lightning registers for
    the fit forwards the signal to the ranks its launcher started, as Lightning's does, and sets the
    flag, without Lightning's broadcast."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.world_size > 1:
            notify_sigterm_with(trainer, partial(self._notify, trainer))

    def _notify(self, trainer: L.Trainer, signum: int, frame: Any) -> None:
        if not self.signalled and trainer.strategy.launcher is not None:
            trainer.strategy.launcher.kill(signum)  # the ranks started as subprocesses (none elsewhere)
        self._on_signal(signum, frame)
