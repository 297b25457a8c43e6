"""SLURM preemption that is safe under DDP: the requeue signal stops training at a step boundary all
ranks agree on (:class:`StepBoundaryStop`), where every rank saves ``hpc_ckpt_<n>.ckpt`` in the run
directory (``last.ckpt`` is saved at that step too) and rank 0 runs ``scontrol requeue``. The requeued job
resumes from that checkpoint (``resume=auto``) exactly: training stops without the validation that
Lightning runs when ``should_stop`` is set. Before and after training the signal requeues the job at
once (callbacks/slurm_signal.py).
"""

from __future__ import annotations

import logging
import re
import signal
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Checkpoint

from callbacks.slurm_signal import REQUEUE_SIGNAL, requeue_failure, slurm_job_id
from callbacks.step_boundary import StepBoundaryStop

log = logging.getLogger(__name__)


HPC_CHECKPOINT = re.compile(r"hpc_ckpt_(\d+)\.ckpt")


def hpc_version(path: Path) -> int | None:
    """``n`` of a file named ``hpc_ckpt_<n>.ckpt``; None for any other name (``hpc_ckpt_2_copy.ckpt``)."""
    named = HPC_CHECKPOINT.fullmatch(path.name)
    return int(named[1]) if named else None


def hpc_checkpoints(directory: Path) -> dict[int, Path]:
    """The ``hpc_ckpt_<n>.ckpt`` files in ``directory`` by version ``n``."""
    versions = {path: hpc_version(path) for path in directory.glob("hpc_ckpt_*.ckpt")}
    return {version: path for path, version in versions.items() if version is not None}


def next_hpc_checkpoint(directory: Path) -> Path:
    return directory / f"hpc_ckpt_{max(hpc_checkpoints(directory), default=0) + 1}.ckpt"


class StoppedForRequeue(Exception):
    """Training stopped at the requeue signal; ``code``: the exit status, 0 once the job is requeued."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class SlurmRequeue(StepBoundaryStop, Checkpoint):
    """A checkpoint callback: placed between the best checkpoint and ``last.ckpt``, it saves after a
    validation has updated the best one, before ``last.ckpt`` is saved."""

    def __init__(self, signum: signal.Signals = REQUEUE_SIGNAL) -> None:
        super().__init__()
        self.signum, self.stopped, self._outside = signum, None, signal.SIG_DFL

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._outside = signal.signal(self.signum, self._on_signal) or signal.SIG_DFL

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """The handler before the fit again: after training, the signal requeues the job at once."""
        if stage == "fit":
            signal.signal(self.signum, self._outside)

    def stop(self, trainer: L.Trainer) -> None:
        """Every rank saves the HPC checkpoint; rank 0 removes the earlier ones and requeues the job."""
        path = next_hpc_checkpoint(Path(trainer.default_root_dir))
        trainer.save_checkpoint(path)
        for earlier in hpc_checkpoints(path.parent).values():  # a whole checkpoint per requeue, else
            if earlier != path:
                trainer.strategy.remove_checkpoint(earlier)  # rank 0
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
                "point: the same train.py command continues it (a job submitted anew, whose run directory "
                "is another: give it resume=%s)",
                slurm_job_id(),
                failure,
                path,
                trainer.global_step,
                path,
            )


def requeue_pending(callbacks: list[L.Callback]) -> bool:
    """Whether the signal came after the fit's last step boundary (in its last validation or at its
    end), so that no step acted on it."""
    return any(isinstance(c, SlurmRequeue) and c.signalled and not c.stopping for c in callbacks)


def requeue_stop(callbacks: list[L.Callback]) -> StoppedForRequeue | None:
    """How a fit that :class:`SlurmRequeue` stopped ends; None when none did."""
    return next((c.stopped for c in callbacks if isinstance(c, SlurmRequeue) and c.stopped), None)
