"""Early stopping whose decision a resumed run keeps."""

from __future__ import annotations

import logging

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason

log = logging.getLogger(__name__)


class KeptEarlyStopping(EarlyStopping):
    """Lightning's EarlyStopping (saved under its state key) whose stop survives a resume: Lightning keeps
    ``trainer.should_stop`` out of checkpoints, so a run continued from one that records an early stop
    (run again to test otherwise, or after a kill in its final validation or test) trained on. Such a
    run now trains no further: it validates and tests as the run that stopped did."""

    @property
    def state_key(self) -> str:
        """EarlyStopping's: checkpoints written before this class find their state."""
        return super().state_key.replace(type(self).__qualname__, EarlyStopping.__qualname__, 1)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.stopping_reason is not EarlyStoppingReason.NOT_STOPPED:
            trainer.should_stop = True
            log.info(
                "%s stopped early at step %d (%s): it trains no further",
                trainer.ckpt_path,
                trainer.global_step,
                self.stopping_reason_message,
            )
