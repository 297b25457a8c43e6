"""Checkpoint files that are complete or absent, never half-written."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

PARTIAL = ".partial-"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a hidden file beside it, fsyncs it and renames it over the target, so a
    kill or a crash mid-write leaves the previous checkpoint whole. Lightning's own save stages the file
    in the system temp dir, which is a copy, not a rename, when that is another filesystem (node-local
    /tmp on clusters), and never fsyncs. What a killed save leaves is removed by the next save."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        for leftover in target.parent.glob(f"{PARTIAL}*"):
            leftover.unlink(missing_ok=True)
        partial = target.parent / f"{PARTIAL}{os.getpid()}"  # no "hpc_ckpt_" in it: Lightning scans for those
        try:
            with open(partial, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        directory = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a power loss
        finally:
            os.close(directory)
