"""``best-step<N>.ckpt``: the best checkpoints by the monitored metric, kept so that every resume point's
recorded best exists, and a resumed run never left with a killed attempt's later ones."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.lightning_compat import DeferredRemovalCheckpoint

log = logging.getLogger(__name__)
FILENAME = "best-step{step}"
STEP = re.compile(r"best-step(\d+)(\.ckpt)?")


class BestCheckpoint(DeferredRemovalCheckpoint):
    """Lightning's ModelCheckpoint (saved under its state key) with two changes:

    - A checkpoint that leaves the top k is removed only once a ``last.ckpt`` recording its replacement
      is written (:meth:`remove_replaced`, called by ``LastCheckpoint``): until then the last
      ``last.ckpt`` records it as best, and a run resumed there (to fewer steps, or killed before it
      validated again) is tested on it.
    - At the start of a fit, the ``best-*`` checkpoints in its folder that the resumed state does not
      record and whose step lies beyond it are removed: a killed attempt's, which this run trains
      again (else ``evaluate.py --ckpt best`` took the newest of them, one this run never recorded)."""

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
        recorded = {Path(path).name for path in (self.best_model_path, *self.best_k_models) if path}
        beyond = [
            path
            for path in sorted(Path(self.dirpath).glob("best-*"))
            if (step := STEP.fullmatch(path.name))
            and int(step.group(1)) > trainer.global_step
            and path.name not in recorded
        ]
        if beyond and trainer.is_global_zero:
            log.info(
                "removed %s: an earlier attempt's, beyond step %d where this run starts (it trains "
                "those steps again)",
                ", ".join(str(path) for path in beyond),
                trainer.global_step,
            )
        for path in beyond:
            trainer.strategy.remove_checkpoint(path)  # rank 0
