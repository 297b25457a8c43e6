"""Loggers that continue the same run after a resume."""

from __future__ import annotations

import csv
from typing import Any

import lightning as L
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only


class _ContinuingWriter(ExperimentWriter):
    """Keeps an existing metrics.csv (Lightning's writer deletes it) and appends to it."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = sorted(csv.DictReader(file).fieldnames or [])

    def drop_from(self, step: int) -> None:
        """Removes the rows logged at ``step`` or later."""
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            rows = list(csv.DictReader(file))
        kept = [row for row in rows if int(row["step"]) < step]
        if len(kept) < len(rows):
            with self._fs.open(self.metrics_file_path, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(kept)


class ResumableCSVLogger(CSVLogger):
    """Continues metrics.csv after a resume. Every row is written as it is logged (also those that
    bypass Lightning's flushing, like the learning-rate monitor's), so a killed run has written every
    row it logged before its checkpoint; :class:`CSVResume` removes those it logged after it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, flush_logs_every_n_steps=1, **kwargs)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def resume_at(self, step: int) -> None:
        """The run continues from a checkpoint at global step ``step``: the rows logged at that step or
        later were written by a killed run after the checkpoint, and the resumed run logs them again.
        (Rows of step ``step - 1``, its last trained batch and the validation after it, stay.)"""
        self.experiment.drop_from(step)


class CSVResume(L.Callback):
    """Tells the :class:`ResumableCSVLogger` where a resumed fit continues."""

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.state.fn != TrainerFn.FITTING:  # validate/test load the best checkpoint too
            return
        for logger in trainer.loggers:
            if isinstance(logger, ResumableCSVLogger):
                logger.resume_at(checkpoint["global_step"])
