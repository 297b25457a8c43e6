"""Every use of Lightning's private internals, in one place.

Exact resume and a continuing CSV log need a few things Lightning keeps private. Each is wrapped or
overridden here and nowhere else, and :func:`check_lightning_internals` (run when a Trainer is built,
and by tests/test_lightning_compat.py) fails loudly, naming the internal, when a Lightning upgrade
changes one of them, instead of letting a resume go silently wrong.
"""

from __future__ import annotations

import csv
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.utilities import load as fabric_load
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.loops.fit_loop import _FitLoop
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.strategies import strategy as lightning_strategy
from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel

# (owner, private member, the parameters it must take; None for a plain attribute)
INTERNALS: list[tuple[type, str, tuple[str, ...] | None]] = [
    (ModelCheckpoint, "_save_last_checkpoint", ("self", "trainer", "monitor_candidates")),
    (ModelCheckpoint, "_monitor_candidates", ("self", "trainer")),
    (ModelCheckpoint, "_should_skip_saving_checkpoint", ("self", "trainer")),
    (ModelCheckpoint, "_should_save_on_exception", ("self", "trainer")),
    (ModelCheckpoint, "_remove_checkpoint", ("self", "trainer", "filepath")),
    (ModelCheckpoint, "_last_global_step_saved", None),
    (ModelCheckpoint, "_last_checkpoint_saved", None),
    (ModelCheckpoint, "_every_n_train_steps", None),
    (_FitLoop, "_combined_loader", None),
    (_TrainingEpochLoop, "_should_check_val_fx", ("self", "data_fetcher")),
    (_TrainingEpochLoop, "_should_accumulate", ("self",)),
    (ExperimentWriter, "_check_log_dir_exists", ("self",)),
    (CSVLogger, "_experiment", None),
    (_SignalConnector, "_sigterm_notifier_fn", ("self", "signum", "_")),
    (_SignalConnector, "received_sigterm", None),
    (_CheckpointConnector, "_hpc_resume_path", None),
    (FSDPStrategy, "_setup_model", ("self", "model")),
]
# (module, private name): module-level internals (a sharded checkpoint's layout)
MODULE_INTERNALS: list[tuple[object, str]] = [
    (fabric_load, "_METADATA_FILENAME"),
    (fabric_load, "_load_distributed_checkpoint"),
    (lightning_strategy, "_ForwardRedirection"),
]


class LightningInternalsChanged(RuntimeError):
    """An internal of Lightning that this project overrides is gone or has another signature."""


def _instance_attributes(owner: type) -> set[str]:
    if owner is ModelCheckpoint:
        return set(vars(ModelCheckpoint()))
    if owner is CSVLogger:
        return set(vars(CSVLogger(save_dir=".")))
    if owner is _SignalConnector:
        return set(vars(_SignalConnector(trainer=None)))
    if owner is _FitLoop:
        return set(vars(_FitLoop(trainer=None)))
    if owner is _CheckpointConnector:  # its properties
        return {name for name, member in vars(owner).items() if isinstance(member, property)}
    return set()


def check_lightning_internals() -> None:
    """Raise :class:`LightningInternalsChanged` naming the first internal that no longer fits."""
    for module, name in MODULE_INTERNALS:
        if not hasattr(module, name):
            raise LightningInternalsChanged(
                f"{module.__name__}.{name} (lightning {L.__version__}) is gone; "
                "callbacks/lightning_compat.py relies on it"
            )
    for owner, name, parameters in INTERNALS:
        where = f"{owner.__name__}.{name} (lightning {L.__version__})"
        if parameters is None:
            if name not in _instance_attributes(owner):
                raise LightningInternalsChanged(
                    f"{where} is gone; callbacks/lightning_compat.py relies on it"
                )
            continue
        member = getattr(owner, name, None)
        if member is None:
            raise LightningInternalsChanged(f"{where} is gone; callbacks/lightning_compat.py relies on it")
        found = tuple(inspect.signature(member).parameters)
        if found != parameters:
            raise LightningInternalsChanged(
                f"{where} now takes {found}, not {parameters}; update callbacks/lightning_compat.py"
            )


# ---- ModelCheckpoint and the fit loop -----------------------------------------------------------
def every_n_train_steps(callback: ModelCheckpoint) -> int:
    return callback._every_n_train_steps


def should_skip_saving(callback: ModelCheckpoint, trainer: L.Trainer) -> bool:
    return callback._should_skip_saving_checkpoint(trainer)


def should_save_on_exception(callback: ModelCheckpoint, trainer: L.Trainer) -> bool:
    """Whether ``callback`` saves on an exception now (not while sanity checking, nor twice a step)."""
    return callback._should_save_on_exception(trainer)


def batch_in_flight(trainer: L.Trainer) -> bool:
    """Whether a training batch has been fetched but not finished (its loader counted it, its dropout
    drew, its optimizer may have stepped some tensors)."""
    batches = trainer.fit_loop.epoch_loop.batch_progress.total
    return batches.ready != batches.completed


def between_epochs(trainer: L.Trainer) -> bool:
    """Whether the fit loop has ended an epoch (its hooks ran, its counters say so) and not begun the
    next one it would train: a checkpoint of this state resumes into an empty epoch, the next one's
    data order lost (one that ends the fit, by its steps, epochs or a stop, resumes as finished)."""
    epochs = trainer.fit_loop.epoch_progress.current
    ended = (
        trainer.should_stop
        or 0 <= trainer.max_steps <= trainer.global_step
        or 0 <= (trainer.max_epochs if trainer.max_epochs is not None else -1) <= epochs.completed
    )
    return trainer.global_step > 0 and epochs.completed == epochs.ready and not ended


# The fit loop's saved counters that :func:`as_saved_at_last_batch_end` rewrites.
LOOP_COUNTERS = [
    (progress, part, count)
    for progress in ("epoch_progress", "epoch_loop.batch_progress")
    for part in ("total", "current")
    for count in ("processed", "completed")
] + [("epoch_loop.state_dict", "_batches_that_stepped")]


def check_loop_state(trainer: L.Trainer) -> None:
    """Raise :class:`LightningInternalsChanged` naming the first of :data:`LOOP_COUNTERS` that the fit
    loop's saved state lacks (checked when training starts, not at a SIGTERM)."""
    loop = trainer.fit_loop.state_dict()
    for path in LOOP_COUNTERS:
        node = loop
        for key in path:
            if not isinstance(node, dict) or key not in node:
                raise LightningInternalsChanged(
                    f"the fit loop's state (lightning {L.__version__}) has no {'/'.join(path)}; "
                    "callbacks/lightning_compat.py rewrites it"
                )
            node = node[key]


def as_saved_at_last_batch_end(checkpoint: dict[str, Any]) -> None:
    """Rewrite the loop state of a checkpoint saved after an epoch ended (:func:`between_epochs`) as
    saved at the end of its last batch (in ``on_train_batch_end``): the epoch not yet processed, the
    batch not yet completed nor counted for loggers."""
    loop = checkpoint["loops"]["fit_loop"]
    for progress in loop["epoch_progress"].values():
        progress["processed"] -= 1
        progress["completed"] -= 1
    for progress in ("total", "current"):
        loop["epoch_loop.batch_progress"][progress]["completed"] -= 1
    loop["epoch_loop.state_dict"]["_batches_that_stepped"] -= 1
    checkpoint["epoch"] -= 1


def accumulating(trainer: L.Trainer) -> bool:
    """Whether the last batch ended half-way through a gradient accumulation window: its gradients live
    only in memory until the window's optimizer step."""
    return trainer.fit_loop.epoch_loop._should_accumulate()


def saved_last_at(callback: ModelCheckpoint, step: int) -> bool:
    """Whether ``callback`` wrote its ``last.ckpt`` in this fit, at ``step`` (Lightning writes it when
    the fit ends only if the fit wrote none)."""
    return bool(callback._last_checkpoint_saved) and callback._last_global_step_saved == step


def mark_saved_at(callback: ModelCheckpoint, step: int) -> None:
    """Tell ``callback`` that the checkpoint of ``step`` exists (a resumed run starts at it)."""
    callback._last_global_step_saved = step


class DeferredRemovalCheckpoint(ModelCheckpoint):
    """A ModelCheckpoint that removes the checkpoints it drops (those Lightning decided to remove: inside
    its folder, not the one resumed from) only when :meth:`remove_deferred` is called."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deferred_removals: list[str] = []

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        self.deferred_removals.append(filepath)  # on every rank, as Lightning decides it on all

    def remove_deferred(self, trainer: L.Trainer, keep: set[str]) -> None:
        """Remove the checkpoints dropped since the last call, but those in ``keep`` (rank 0 removes)."""
        dropped, self.deferred_removals = self.deferred_removals, []
        for filepath in dict.fromkeys(dropped):
            if filepath not in keep:
                trainer.strategy.remove_checkpoint(filepath)


class TrainLoaderAfterRestore(Callback):
    """Has the fit build its training loader after a resumed checkpoint is restored. Asked for
    ``estimated_stepping_batches`` in ``configure_optimizers`` (the learning-rate curve spans the run's
    steps) by a run with ``max_epochs``, Lightning builds the loader then, before the restore, and never
    gives it the checkpoint's position (Lightning issue #20550): a run resumed mid-epoch trained the
    epoch's first batches again. That loader is dropped when the fit starts, between the two."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.fit_loop._combined_loader = None


def save_last(callback: ModelCheckpoint, trainer: L.Trainer) -> None:
    """Write ``callback``'s ``last.ckpt`` now."""
    callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))


def validation_follows_this_batch(trainer: L.Trainer) -> bool:
    """Whether the fit loop validates right after the batch that just ended."""
    return trainer.fit_loop.epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher)


# ---- SLURM resume ------------------------------------------------------------------------------
class _NoHpcScan(_CheckpointConnector):
    @property
    def _hpc_resume_path(self) -> None:
        return None


def without_hpc_scan(trainer: L.Trainer) -> None:
    """Stop Lightning's own SLURM resume: on SLURM it loads the newest ``hpc_ckpt_*`` of the run folder
    whenever ``fit``, ``validate`` or ``test`` gets ``ckpt_path=None``, so a requeued run's final scores
    were those of its stale requeue checkpoint, and another ``hpc_ckpt_*`` name (a backup copy) stopped
    every call. The project finds its resume point itself (timerefine/pipeline/resume.py) and passes
    the file."""
    trainer._checkpoint_connector.__class__ = _NoHpcScan


# ---- SIGTERM -----------------------------------------------------------------------------------
def notify_sigterm_with(trainer: L.Trainer, notifier: Callable[[int, Any], None]) -> None:
    """Make ``notifier`` what Lightning's SIGTERM handler calls (registered when a fit starts, restored
    when it ends) in place of its own notifier, which broadcasts inside the handler."""
    trainer._signal_connector._sigterm_notifier_fn = notifier


def stop_after_this_step(trainer: L.Trainer) -> None:
    """Have Lightning stop the fit at the end of this training step, after its validation and hooks:
    its SIGTERM stop (a SIGTERMException), raised there on every rank that calls this."""
    trainer._signal_connector.received_sigterm = True


def stops_after_this_step(trainer: L.Trainer) -> bool:
    """Whether Lightning stops the fit at the end of this step (a SIGTERM, :func:`stop_after_this_step`)."""
    return trainer.received_sigterm


# ---- CSVLogger that continues its file ----------------------------------------------------------
class ContinuingExperimentWriter(ExperimentWriter):
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


class ContinuingCSVLogger(CSVLogger):
    """A CSVLogger whose experiment is a :class:`ContinuingExperimentWriter`."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ContinuingExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ContinuingExperimentWriter(log_dir=self.log_dir)
        return self._experiment


# ---- FSDP: the root unit kept, a module's method called from a callback ------------------------------
class KeptRootFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy whose validation and test after fitting use the fit's root unit: given
    the module again, Lightning found its decoder layers wrapped and left the root off, so every other
    layer saw its flat shard ("'weight' must be 2-D"; Lightning issue 19015)."""

    def _setup_model(self, model: nn.Module) -> nn.Module:
        root = getattr(self, "_root", None)
        if isinstance(root, FullyShardedDataParallel) and root.module is model:
            return root
        self._root = super()._setup_model(model)
        return self._root


def as_a_step(trainer: L.Trainer, module: L.LightningModule, method: str, *args: Any) -> Any:
    """``module.<method>(*args)`` as Lightning calls a step: under FSDP inside the root unit's forward,
    which gathers the sharded weights (called directly, a layer saw its flat shard); on every rank."""
    root = trainer.strategy.model
    if isinstance(root, FullyShardedDataParallel):
        return lightning_strategy._ForwardRedirection()(root, module, method, *args)
    return getattr(module, method)(*args)


# ---- sharded (FSDP) checkpoints: folders ------------------------------------------------------
def sharded_checkpoint_metadata(folder: Path) -> Path:
    """The file of a sharded checkpoint folder that holds everything but the weights."""
    return folder / fabric_load._METADATA_FILENAME


def load_sharded_checkpoint(folder: Path) -> dict[str, Any]:
    """A sharded checkpoint folder as one full checkpoint dict (on CPU), its weights under
    ``state_dict`` as a file holds them (Lightning's FSDP strategy saves them as ``model``)."""
    checkpoint = fabric_load._load_distributed_checkpoint(folder)
    if "model" in checkpoint:
        checkpoint["state_dict"] = checkpoint.pop("model")
    return checkpoint
