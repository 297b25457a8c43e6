"""``last.ckpt``: the resume point, written every n steps, at the final step, and on a crash between
steps (not on a NaN loss, whose weights are no resume point); resumed in a run folder that was copied or moved, it
moves the checkpoint callbacks' saved paths into that folder."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from callbacks.best_checkpoint import BestCheckpoint
from callbacks.lightning_compat import (
    accumulating,
    as_saved_at_last_batch_end,
    batch_in_flight,
    between_epochs,
    check_loop_state,
    every_n_train_steps,
    mark_saved_at,
    save_last,
    saved_last_at,
    should_save_on_exception,
    should_skip_saving,
    stops_after_this_step,
    validation_follows_this_batch,
)

log = logging.getLogger(__name__)


# A ModelCheckpoint state that records no best checkpoint: what one whose best file is gone becomes.
FORGOTTEN_BEST = {
    "best_model_path": "",
    "best_model_score": None,
    "best_k_models": {},
    "kth_best_model_path": "",
}


def relocated(state: dict[str, Any], dirpath: str) -> dict[str, Any]:
    """A ModelCheckpoint's saved ``state`` made this run's: its ``dirpath`` set to ``dirpath`` (Lightning
    keeps the best score and the top-k only when the saved one is its own), and the paths inside the
    saved ``dirpath`` moved to ``dirpath`` (paths elsewhere kept) when its best checkpoint is there: the
    folder was copied or moved. Else (another run's checkpoint, resumed in a new folder) the paths keep
    pointing at that run's files: its best checkpoint and score stay the best until a validation beats
    them, and Lightning never deletes them (outside its ``dirpath``). A best checkpoint that is gone
    (another run's folder deleted, a checkpoint file copied alone) is forgotten with its score: tested
    at the end, it would stop the run at every attempt; the run's own validations choose anew."""
    saved = state.get("dirpath")
    if saved and saved != dirpath:
        state = _moved(state, saved, dirpath)
    best = state.get("best_model_path")
    return state | FORGOTTEN_BEST if best and not Path(best).exists() else state  # FSDP's: a folder


def _moved(state: dict[str, Any], saved: str, dirpath: str) -> dict[str, Any]:
    def moved(path: str | None) -> str | None:
        if not path or not Path(path).is_relative_to(saved):
            return path
        return str(Path(dirpath) / Path(path).relative_to(saved))

    paths = {
        key: moved(state.get(key)) for key in ("best_model_path", "kth_best_model_path", "last_model_path")
    }
    if paths["best_model_path"] and not Path(paths["best_model_path"]).exists():  # not a moved folder
        return state | {"dirpath": dirpath}
    best_k = {moved(path): score for path, score in state.get("best_k_models", {}).items()}
    return state | paths | {"dirpath": dirpath, "best_k_models": best_k}


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
            enable_version_counter=False,  # last.ckpt is overwritten, never set beside as last-v1.ckpt
        )
        self._after_validation, self._stopped_between_epochs = False, False

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        """``last.ckpt`` (only: ModelCheckpoint's own would add an ``epoch=..-step=..`` copy at every
        interruption) on a crash, a SIGTERM or Ctrl-C between two steps. Mid-step or mid-validation, and
        on an arithmetic crash (a NaN loss), the last ``last.ckpt`` stays the resume point: the state
        then is none to continue from exactly (the steps since are trained again)."""
        if isinstance(exception, ArithmeticError) or not should_save_on_exception(self, trainer):
            return
        if not (batch_in_flight(trainer) or accumulating(trainer) or trainer.validating):
            self._stopped_between_epochs = between_epochs(trainer)  # see on_save_checkpoint
            try:
                self._save(trainer)
            finally:
                self._stopped_between_epochs = False
        else:
            log.warning(
                "stopped inside a step or its validation at step %d: the resume point stays %s",
                trainer.global_step,
                self.last_model_path or "none (no checkpoint yet: the run starts over)",
            )

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """A SIGTERM after an epoch's last step stops Lightning after the epoch's end, whose loop state
        it would resume into an empty epoch (the next one's data order lost): saved there (only: at the
        fit's end Lightning resumes its own state), the state is the one written at the end of that
        last step, which resumes into the next epoch."""
        if self._stopped_between_epochs:
            as_saved_at_last_batch_end(checkpoint)

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Before the callbacks load their state: in a run folder copied or moved since the checkpoint
        was written, their paths point into this folder; from another run's checkpoint in a new folder,
        they keep pointing at that run's best checkpoint. Either way their ``dirpath`` is this folder's:
        Lightning would otherwise drop the best score (the next validation becomes "best", however it
        scores, and the run is tested on it). A test reads none of them: it is not warned of."""
        states = checkpoint.get("callbacks", {})
        for key, state in states.items():
            if isinstance(state, dict) and "dirpath" in state:  # rank 0 decides: ranks must agree
                states[key] = trainer.strategy.broadcast(relocated(state, self.dirpath), src=0)
                best = states[key]["best_model_path"]
                if trainer.state.fn != TrainerFn.FITTING:
                    continue
                if state.get("best_model_path") and not best:
                    rank_zero_warn(
                        f"the best checkpoint {state['best_model_path']} that the resumed checkpoint "
                        "records is gone: this run's own validations choose its best anew"
                    )
                elif best and not Path(best).resolve().is_relative_to(Path(self.dirpath).resolve()):
                    rank_zero_warn(  # a folder copied without its best checkpoint, or another run's
                        f"the best checkpoint so far is {best}, outside this run's folder: the run is "
                        "tested on it unless one of its own validations scores better"
                    )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        check_loop_state(trainer)  # what on_save_checkpoint rewrites
        mark_saved_at(self, trainer.global_step)  # a resumed run starts at its checkpoint

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        every = every_n_train_steps(self)
        due = (every > 0 and trainer.global_step % every == 0) or trainer.global_step == trainer.max_steps
        if not due or should_skip_saving(self, trainer):
            return
        if validation_follows_this_batch(trainer):
            self._after_validation = True
        else:
            self._save(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Also when Lightning stops at the end of this step (a SIGTERM): saved at the exception, after
        the step's end, the resumed run would log its steps one too far."""
        if (self._after_validation or stops_after_this_step(trainer)) and not trainer.sanity_checking:
            self._after_validation = False
            self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """When the fit ended after its last ``last.ckpt`` (its last epoch, an early stop between two
        of them): the run's end is the resume point (Lightning writes it only when the fit wrote none;
        continued, the run trained its last steps again). Written by :meth:`_save`, the best checkpoints
        it no longer records go as well."""
        if not saved_last_at(self, trainer.global_step):
            self._save(trainer)

    def _save(self, trainer: L.Trainer) -> None:
        """Write ``last.ckpt``; then the best checkpoints it no longer records as best can go."""
        save_last(self, trainer)
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, BestCheckpoint):
                callback.remove_replaced(trainer)
