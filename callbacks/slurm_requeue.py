"""SLURM preemption that is safe under DDP: the requeue signal stops training at a step boundary all
ranks agree on (:class:`StepBoundaryStop`), where every rank saves ``hpc_ckpt_<n>.ckpt`` in the run
directory (``last.ckpt`` is saved at that step too) and rank 0 runs ``scontrol requeue``. The requeued job
resumes from that checkpoint (``resume=auto``) exactly: training stops without the validation that
Lightning runs when ``should_stop`` is set.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Checkpoint

from callbacks.step_boundary import StepBoundaryStop

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


def requeue_failure(job: str) -> str | None:
    """Run ``scontrol requeue job``; why it failed (its exit status and last line), None once requeued."""
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, check=False)
    except OSError as error:
        return str(error)
    if done.returncode == 0:
        return None
    lines = (done.stderr or done.stdout).strip().splitlines()
    return f"exit status {done.returncode}" + (f": {lines[-1].strip()}" if lines else "")


class StoppedForRequeue(Exception):
    """Training stopped at the requeue signal; ``code``: the exit status, 0 once the job is requeued."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class SlurmRequeue(StepBoundaryStop, Checkpoint):
    """A checkpoint callback: placed between the best checkpoint and ``last.ckpt``, it saves after a
    validation has updated the best one, before ``last.ckpt`` is saved."""

    def __init__(self, signum: signal.Signals = signal.SIGUSR1) -> None:
        super().__init__()
        self.signum, self.stopped = signum, None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            signal.signal(self.signum, self._on_signal)

    def stop(self, trainer: L.Trainer) -> None:
        """Every rank saves the HPC checkpoint; rank 0 requeues the job."""
        path = next_hpc_checkpoint(Path(trainer.default_root_dir))
        trainer.save_checkpoint(path)
        failure = requeue_failure(slurm_job_id()) if trainer.is_global_zero else None
        failure = trainer.strategy.broadcast(failure, src=0)  # every rank exits alike
        self.stopped = StoppedForRequeue(0 if failure is None else 1)
        super().stop(trainer)
        if not trainer.is_global_zero:
            return
        if failure is None:
            log.info(
                "stopped for a SLURM requeue at step %d: saved %s; the requeued job %s resumes from it",
                trainer.global_step,
                path,
                slurm_job_id(),
            )
        else:
            log.error(
                "scontrol requeue %s failed (%s): the job is not requeued; %s (step %d) is the resume "
                "point, the same command continues it",
                slurm_job_id(),
                failure,
                path,
                trainer.global_step,
            )


def requeue_stop(callbacks: list[L.Callback]) -> StoppedForRequeue | None:
    """How a fit that :class:`SlurmRequeue` stopped ends; None when none did."""
    return next((c.stopped for c in callbacks if isinstance(c, SlurmRequeue) and c.stopped), None)
