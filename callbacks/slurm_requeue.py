"""SLURM preemption that is safe under DDP: act on the requeue signal at a step boundary all ranks agree on.

Lightning's own handler saves the HPC checkpoint inside the signal handler; the save ends in a
barrier, so under DDP a rank that handles the signal while another sits in a gradient all-reduce
deadlocks both (Lightning-AI/pytorch-lightning#21406). Here the handler only sets a flag. After each
training batch the ranks agree (one all-reduce) whether any of them got the signal; then every rank
saves ``hpc_ckpt_<n>.ckpt`` in the run directory, rank 0 runs ``scontrol requeue``, and training stops.
The requeued job resumes from that checkpoint (``resume=auto``).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import lightning as L

from callbacks.lightning_compat import accumulating

log = logging.getLogger(__name__)


def slurm_job_id() -> str:
    """The id ``scontrol requeue`` needs: ``<array job>_<task>`` for array tasks."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]


def hpc_checkpoints(directory: Path) -> dict[int, Path]:
    """The ``hpc_ckpt_<n>.ckpt`` files in ``directory`` by version ``n``."""
    return {int(p.stem.rsplit("_", 1)[1]): p for p in directory.glob("hpc_ckpt_*.ckpt")}


def next_hpc_checkpoint(directory: Path) -> Path:
    return directory / f"hpc_ckpt_{max(hpc_checkpoints(directory), default=0) + 1}.ckpt"


class SlurmRequeue(L.Callback):
    def __init__(self, signum: signal.Signals = signal.SIGUSR1) -> None:
        self.signum, self.signalled, self.requeued = signum, False, False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            signal.signal(self.signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signalled = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        """At the end of a step: half-way through an accumulation window, gradients live only in memory."""
        if accumulating(trainer) or not trainer.strategy.reduce_boolean_decision(self.signalled, all=False):
            return
        path = next_hpc_checkpoint(Path(trainer.default_root_dir))
        trainer.save_checkpoint(path)
        self.requeued, trainer.should_stop = True, True
        if trainer.is_global_zero:
            job = slurm_job_id()
            log.info("requeue signal: saved %s at step %d, requeueing job %s", path, trainer.global_step, job)
            subprocess.run(["scontrol", "requeue", job], check=False)
