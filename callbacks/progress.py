"""Progress bars whose training description counts optimizer steps (``Epoch 3, step 80/1200``) and
whose metrics are the logged ones only.

A run ends at ``max_steps`` with ``max_epochs=-1``, for which Lightning's Rich bar shows ``Epoch 9/-2``
and its tqdm bar only the epoch. Lightning also shows the loggers' version as ``v_num``, cut to its
last 4 characters (``oard`` of ``tensorboard``), which says nothing here.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar


def train_description(trainer: L.Trainer) -> str:
    """``Epoch e`` (``/last`` only when max_epochs bounds the run), then ``, step s/max_steps``."""
    text = f"Epoch {trainer.current_epoch}"
    if trainer.max_epochs is not None and trainer.max_epochs >= 0:
        text += f"/{trainer.max_epochs - 1}"
    if trainer.max_steps > 0:
        text += f", step {trainer.global_step}/{trainer.max_steps}"
    return text


class WithoutVersion(ProgressBar):
    """Leaves ``v_num`` out of the bar's metrics."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class StepRichProgressBar(WithoutVersion, RichProgressBar):
    def _get_train_description(self, current_epoch: int) -> str:
        return train_description(self.trainer)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id, description=train_description(trainer))
        super().on_train_batch_end(trainer, *args)


class StepTQDMProgressBar(WithoutVersion, TQDMProgressBar):
    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(train_description(trainer))

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.train_progress_bar.set_description(train_description(trainer), refresh=False)
        super().on_train_batch_end(trainer, *args)


def progress_bar(kind: str, stdout: TextIO | None = None) -> ProgressBar | None:
    """The bar ``callbacks.progress_bar`` names; ``auto`` is Rich on a terminal (``stdout``, by default
    the process's now) and tqdm otherwise, since Rich draws nothing into a file (a SLURM ``.out``,
    ``> log``) until the run ends."""
    if kind == "auto":
        kind = "rich" if (stdout or sys.stdout).isatty() else "tqdm"
    bars = {"rich": StepRichProgressBar, "tqdm": StepTQDMProgressBar}
    return bars[kind]() if kind in bars else None
