"""SLURM's requeue signal (``--signal=USR1@<seconds>``) outside training: before the fit's training
begins (imports, data, the LM's load) or after it ends (the final validation and test), nothing has
trained since the job's resume point, so rank 0 requeues the job at once. Left to its default action the
signal ended the process: the job failed, not requeued. Standard library only, so that ``train.py``
installs it before its heavy imports; during training :class:`callbacks.slurm_requeue.SlurmRequeue`
takes the signal over and stops at a step boundary with a checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from types import FrameType

REQUEUE_SIGNAL = signal.SIGUSR1  # what sbatch_template's --signal sends
_installed_in: list[int] = []  # the process that set the handler (its DataLoader workers inherit it)


def in_slurm_job() -> bool:
    """Whether Lightning runs this process as a SLURM job (``SLURMEnvironment.detect()``, whose test
    this repeats without importing Lightning; tests/test_slurm_requeue_runs.py compares the two): only
    then does :class:`~callbacks.slurm_requeue.SlurmRequeue` take the signal over during training."""
    return "SLURM_NTASKS" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def slurm_job_id() -> str:
    """The id ``scontrol requeue`` needs: ``<array job>_<task>`` for array tasks."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]


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


def requeue_at_once(signum: int, frame: FrameType | None) -> None:
    """Rank 0 requeues the job and exits 0 (SLURM stops the other tasks); if the requeue fails, the job
    runs on, and says so."""
    if os.environ.get("SLURM_PROCID", "0") != "0" or os.getpid() not in _installed_in:
        return
    job = slurm_job_id()
    if (failure := requeue_failure(job)) is None:
        print(
            f"SLURM's requeue signal came outside training: requeued job {job} at once (nothing has "
            "trained since its resume point)",
            file=sys.stderr,
        )
        raise SystemExit(0)
    print(
        f"ERROR: SLURM's requeue signal came outside training, and scontrol requeue {job} failed "
        f"({failure}): the job runs on until its time limit",
        file=sys.stderr,
    )


def requeue_outside_training() -> None:
    """In a SLURM job, have the requeue signal requeue it at once until training takes the signal over."""
    if in_slurm_job():
        _installed_in[:] = [os.getpid()]
        signal.signal(REQUEUE_SIGNAL, requeue_at_once)
