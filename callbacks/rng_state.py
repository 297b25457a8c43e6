"""The global random state (dropout) in checkpoints, so a resumed run draws what the uninterrupted run
would have drawn."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch


class RandomState(L.Callback):
    """Saves the Python, NumPy, torch and current-CUDA-device generators with every checkpoint and puts
    them back when training resumes (after the sanity check, which Lightning runs on its own state).
    Every process is seeded alike and draws alike, so rank 0's saved state serves every rank."""

    def __init__(self) -> None:
        self.saved: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        name, keys, *rest = np.random.get_state()
        state = {
            "python": random.getstate(),
            "numpy": (name, keys.tolist(), *rest),  # plain values: checkpoints load with weights_only
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.saved = state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.saved is None:
            return
        random.setstate(self.saved["python"])
        name, keys, *rest = self.saved["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
        torch.set_rng_state(self.saved["torch"])
        if "cuda" in self.saved and torch.cuda.is_available():
            torch.cuda.set_rng_state(self.saved["cuda"])
        self.saved = None
