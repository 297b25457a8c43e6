"""On-policy refinement: start training targets from the model's own coarse guesses.

The reference recipe draws every coarse segment around the ground truth, so the offsets never
learn to correct the model's real errors. Every ``every_n_steps`` this callback re-predicts a
random subset of training queries and keeps each one's first coarse segment in the datamodule's
``coarse_guesses``, which its collator was built to read: with probability ``fraction`` a guess is
the first coarse segment of that query's target. The collator runs in the main process right before
each step (``GroundingDataModule.on_before_batch_transfer``), so a refresh reaches the next batch
whatever ``data.num_workers`` (workers would keep the guesses of their epoch's start).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch.distributed as dist

from callbacks.lightning_compat import accumulating, as_a_step
from grounding.checks import PROBABILITY, Checked, checked, integer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OnPolicySpec(Checked):
    """``fraction``: share of training targets whose first coarse segment is the model's own cached
    guess (0 = off, the reference recipe); refreshed every ``every_n_steps`` on ``num_samples``
    training queries."""

    fraction: float = checked(0.0, PROBABILITY)
    every_n_steps: int = checked(250, integer(1))
    num_samples: int = checked(512, integer(1))


class OnPolicyCoarse(L.Callback):
    """Refreshes the guesses every ``spec.every_n_steps`` steps, predicting ``batch_size`` at a time."""

    def __init__(self, spec: OnPolicySpec, batch_size: int = 64) -> None:
        self.every_n_steps, self.num_samples, self.batch_size = (
            spec.every_n_steps,
            spec.num_samples,
            batch_size,
        )
        self.coarse: dict[str, tuple[int, int]] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.coarse = trainer.datamodule.coarse_guesses  # what the collator reads

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        """After every ``every_n_steps``-th step (its last accumulated batch), once the LM has trained:
        a guess made during ``saliency.projector_steps`` would be an untrained LM's."""
        step, lm_from = trainer.global_step, getattr(pl_module, "projector_steps", 0)
        if step % self.every_n_steps == 0 and step > lm_from and not accumulating(trainer):
            self.refresh(trainer, pl_module)

    def refresh(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dataset = trainer.datamodule.datasets["train"]
        rng = np.random.default_rng([trainer.global_step, trainer.global_rank])
        count = min(self.num_samples // trainer.world_size, len(dataset))
        indices = rng.choice(len(dataset), size=count, replace=False)
        found: dict[str, tuple[int, int]] = {}
        pl_module.eval()
        for start in range(0, count, self.batch_size):
            items = [
                dataset[(trainer.current_epoch, int(i))] for i in indices[start : start + self.batch_size]
            ]
            batch = pl_module.transfer_batch_to_device(
                trainer.datamodule.collator(items), pl_module.device, 0
            )
            for record, prediction in zip(
                batch["records"], as_a_step(trainer, pl_module, "predict_batch", batch), strict=True
            ):
                if prediction.segments:
                    found[record.qid] = tuple(round(x) for x in prediction.segments[0])
        pl_module.train()
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            parts: list[dict] = [{} for _ in range(trainer.world_size)]
            dist.all_gather_object(parts, found)
            found = {k: v for part in parts for k, v in part.items()}
        self.coarse.update(found)
        log.info(
            "on-policy refinement: %d queries now start from the model's own coarse guess", len(self.coarse)
        )

    def state_dict(self) -> dict[str, Any]:
        return {"coarse": dict(self.coarse)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.coarse.clear()
        self.coarse.update({k: tuple(v) for k, v in state_dict["coarse"].items()})
