"""The best checkpoint of a run, as its ModelCheckpoint recorded it (never guessed from file names)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from callbacks.lightning_compat import sharded_checkpoint_metadata


def trainer_state(checkpoint: Path) -> dict[str, Any]:
    """A checkpoint's dict without reading its weights (mapped lazily); a sharded checkpoint (a folder)
    keeps everything but the weights in its metadata file."""
    file = sharded_checkpoint_metadata(checkpoint) if checkpoint.is_dir() else checkpoint
    return torch.load(file, map_location="cpu", weights_only=False, mmap=True)


def recorded_best(checkpoint_dir: Path) -> Path:
    """The ``best_model_path`` in the newest checkpoint of ``checkpoint_dir``, taken from that folder (a
    moved run still finds it). At equal steps a ``best-*`` checkpoint, written after validation, is newer
    than ``last.ckpt``, written at the batch's end before it. Raises FileNotFoundError."""
    states = {path: trainer_state(path) for path in checkpoint_dir.glob("*.ckpt")}
    if not states:
        raise FileNotFoundError(f"no checkpoint in {checkpoint_dir}")
    newest = max(states, key=lambda path: (states[path]["global_step"], not path.name.startswith("last")))
    callbacks = states[newest].get("callbacks", {})
    best = next((s["best_model_path"] for k, s in callbacks.items() if k.startswith("ModelCheckpoint{")), "")
    if not best:
        raise FileNotFoundError(f"{newest} records no best checkpoint (no validation yet?); try --ckpt last")
    path = checkpoint_dir / Path(best).name
    if not path.exists():
        raise FileNotFoundError(f"{newest} records {path} as the best checkpoint, but it is gone")
    return path


def checkpoint_path(run_dir: Path, ckpt: str) -> Path:
    """``best`` (as the run's ModelCheckpoint recorded it), ``last`` or a path; FileNotFoundError if none."""
    if ckpt == "best":
        return recorded_best(run_dir / "checkpoints")
    path = run_dir / "checkpoints" / "last.ckpt" if ckpt == "last" else Path(ckpt)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return path
