"""``python -m tests.ddp_rank_weights OUT_DIR [train.py overrides]``: train.py, with every process writing
its parameters to ``OUT_DIR/rank<r>.pt`` when fitting ends, so a test can compare the ranks' weights
(Lightning's DDP launcher starts this same module on each rank)."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch

from timerefine import train
from timerefine.pipeline.build import build_trainer


class SaveRankWeights(L.Callback):
    def __init__(self, out_dir: Path):
        self.out_dir = out_dir

    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        weights = {name: p.detach().cpu() for name, p in module.named_parameters()}
        torch.save(weights, self.out_dir / f"rank{trainer.global_rank}.pt")


def main(out_dir: Path, overrides: list[str]) -> int:
    def trainer_saving_weights(*args, **kwargs) -> L.Trainer:
        trainer = build_trainer(*args, **kwargs)
        trainer.callbacks.append(SaveRankWeights(out_dir))
        return trainer

    train.build_trainer = trainer_saving_weights
    return train.main(overrides)


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2:]))
