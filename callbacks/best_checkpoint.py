"""``best-step<N>.ckpt``: the best checkpoints by the monitored metric, kept so that every resume point's
recorded best exists, and a resumed run never left with a killed attempt's later ones."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.lightning_compat import DeferredRemovalCheckpoint
from callbacks.slurm_requeue import hpc_version

log = logging.getLogger(__name__)
FILENAME = "best-step{step}"
STEP = re.compile(r"best-step(\d+)(\.ckpt)?")


class BestCheckpoint(DeferredRemovalCheckpoint):
    """Lightning's ModelCheckpoint (saved under its state key) with two changes:

    - A checkpoint that leaves the top k is removed only once a ``last.ckpt`` recording its replacement
      is written (:meth:`remove_replaced`, called by ``LastCheckpoint``): until then the last
      ``last.ckpt`` records it as best, and a run resumed there (to fewer steps, or killed before it
      validated again) is tested on it.
    - At the start of a fit that starts over in its folder or continues from the folder's own resume
      point, the ``best-*`` checkpoints there that the resumed state does not record are removed: an
      interrupted attempt's, which this run trains again (else ``evaluate.py --ckpt best`` took the
      newest of them, one this run never recorded), or ones replaced whose removal the interruption
      (a kill, a SLURM requeue) cut short. Resumed from any other checkpoint, nothing is removed."""

    def __init__(self, dirpath: str | Path, monitor: str | None, mode: str, save_top_k: int) -> None:
        super().__init__(
            dirpath=dirpath,
            filename=FILENAME,
            auto_insert_metric_name=False,
            monitor=monitor,
            mode=mode,
            save_top_k=save_top_k,
            enable_version_counter=False,  # a resumed run that validates a step again overwrites its file
        )

    @property
    def state_key(self) -> str:
        """ModelCheckpoint's: checkpoints written before this class (and ``recorded_best``) find it."""
        return ModelCheckpoint.state_key.fget(self).replace(type(self).__qualname__, "ModelCheckpoint", 1)

    def remove_replaced(self, trainer: L.Trainer) -> None:
        """Remove the checkpoints replaced since the last call, now that a ``last.ckpt`` recording their
        replacements is written; one recorded again since (its step validated anew) stays."""
        self.remove_deferred(trainer, keep={self.best_model_path, *self.best_k_models})

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.deferred_removals = []  # a fit before this one's, in the same process
        if not continues_its_folder(trainer.ckpt_path, Path(self.dirpath)):
            return  # another checkpoint (an earlier one of this run, another run's): its files stay
        recorded = {Path(path).resolve() for path in (self.best_model_path, *self.best_k_models) if path}
        stale = [
            path
            for path in sorted(Path(self.dirpath).glob("best-*"))
            if STEP.fullmatch(path.name) and path.resolve() not in recorded
        ]
        if stale and trainer.is_global_zero:
            log.info(
                "removed %s: not recorded by the checkpoint this run continues from at step %d (an "
                "interrupted attempt's, which it trains again, or one replaced before the interruption)",
                ", ".join(str(path) for path in stale),
                trainer.global_step,
            )
        for path in stale:
            trainer.strategy.remove_checkpoint(path)  # rank 0


def continues_its_folder(ckpt_path: str | Path | None, dirpath: Path) -> bool:
    """Whether a fit starts over in its folder (no checkpoint) or continues from the folder's own resume
    point (its ``last.ckpt``, or a SLURM ``hpc_ckpt_<n>.ckpt`` in the run folder), whose recorded best
    checkpoints are then all that the folder's ``best-*`` should hold."""
    if ckpt_path is None:
        return True
    path, folder = Path(ckpt_path).resolve(), dirpath.resolve()
    return (path.name == "last.ckpt" and path.parent == folder) or (
        hpc_version(path) is not None and path.parent == folder.parent
    )
