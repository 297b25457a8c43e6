"""SLURM's requeue signal without a SLURM controller: the job's environment faked, ``scontrol`` a stub
that succeeds or fails (as for a job submitted with --no-requeue). A requeued run resumes to the end
of an uninterrupted one, ``last.ckpt`` staying the one resume point (never set beside as
``last-v1.ckpt``). Real SLURM jobs: test_slurm_jobs.py."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.plugins.environments import SLURMEnvironment

from callbacks.slurm_signal import in_slurm_job
from timerefine.pipeline.previous_run import removed_by_requeue

ROOT = Path(__file__).resolve().parents[1]
SLURM = {
    "SLURM_NTASKS": "1",
    "SLURM_JOB_NAME": "tr",
    "SLURM_JOB_ID": "77",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_NODELIST": "localhost",
}
RUN = [
    "experiment=tiny",
    "trainer.max_steps=14",
    "trainer.val_check_interval=5",
    "trainer.log_every_n_steps=1",
    "callbacks.checkpoint.last_every_n_steps=100",  # last.ckpt only at the end and where a run stops
    "test=false",
]
# Sends ``signal`` to the run itself inside the training step that ends at ``step``.
SIGNALLED_RUN = """
import os, sys
from lightning_modules.grounding_module import GroundingModule
from timerefine import train
step, number = int(sys.argv[1]), int(sys.argv[2])
hook = GroundingModule.training_step
def signalled(self, batch, batch_idx):
    if self.trainer.global_step == step - 1:
        os.kill(os.getpid(), number)
    return hook(self, batch, batch_idx)
GroundingModule.training_step = signalled
sys.exit(train.main(sys.argv[3:]))
"""


def slurm_env(tmp_path: Path, scontrol_status: int) -> dict[str, str]:
    """The faked job's environment, with a ``scontrol`` that exits ``scontrol_status``."""
    stub = tmp_path / "bin" / "scontrol"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text(
        f"#!/bin/sh\necho 'scontrol: error: Requeue of job not allowed' >&2\nexit {scontrol_status}\n"
    )
    stub.chmod(0o755)
    return dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{stub.parent}:{os.environ['PATH']}", **SLURM)


def train(output_dir: Path, env: dict[str, str], *prefix: str) -> subprocess.CompletedProcess:
    args = [*prefix, *RUN, f"output_dir={output_dir}"]
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def outcome(output_dir: Path) -> tuple[dict, list[dict], list[str]]:
    """The run's metrics.json, metrics.csv rows and checkpoint file names."""
    with open(output_dir / "logs" / "csv" / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    names = sorted(path.name for path in (output_dir / "checkpoints").iterdir())
    return json.loads((output_dir / "metrics.json").read_text()), rows, names


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("requeue") / "uninterrupted"
    done = train(output_dir, slurm_env(output_dir.parent, 0), "train.py")
    assert done.returncode == 0, done.stderr[-4000:]
    return output_dir


@pytest.mark.slow
@pytest.mark.parametrize(("step", "scontrol_status"), [(7, 1), (10, 0)])
def test_requeued_run_resumes_to_the_uninterrupted_runs_end(tmp_path, uninterrupted, step, scontrol_status):
    """Before: training stopped by ``should_stop``, so Lightning validated at the signal's step (a row
    and maybe a best checkpoint an uninterrupted run never has); a failed ``scontrol requeue`` exited 0
    saying the requeued job resumes; the resumed run wrote ``last-v1.ckpt`` beside a stale ``last.ckpt``.
    Now at step 7 the run stops without validating, at step 10 after the validation every run has
    there; a failed requeue is an error, exit status 1; the resumed run ends as the uninterrupted one."""
    output_dir, env = tmp_path / "run", slurm_env(tmp_path, scontrol_status)
    stopped = train(output_dir, env, "-c", SIGNALLED_RUN, str(step), str(int(signal.SIGUSR1)))
    assert stopped.returncode == scontrol_status, stopped.stderr[-4000:]
    if scontrol_status:
        assert "scontrol requeue 77 failed (exit status 1: scontrol: error: Requeue of job not allowed)" in (
            stopped.stderr
        )
        assert (
            f"the same train.py command continues it (a job submitted anew, whose run directory is another: give it resume={output_dir / 'hpc_ckpt_1.ckpt'})"
            in stopped.stderr
        )
    else:
        assert "the requeued job 77 resumes from it" in stopped.stderr
    hpc = torch.load(output_dir / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=False)
    assert hpc["global_step"] == step

    resumed = train(output_dir, env, "train.py")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "hpc_ckpt_1.ckpt" in resumed.stderr
    metrics, rows, names = outcome(output_dir)
    expected_metrics, expected_rows, expected_names = outcome(uninterrupted)
    assert (metrics, names) == (expected_metrics, expected_names)
    assert rows == expected_rows


@pytest.mark.slow
def test_a_second_requeue_keeps_only_the_newest_hpc_checkpoint(tmp_path, uninterrupted):
    """Before (review): every requeue left a whole hpc_ckpt_<n>.ckpt behind, model and optimizer. A
    command that names the one removed (resume=<run>/hpc_ckpt_1.ckpt) continues from the newest. A
    user's copy (hpc_ckpt_backup.ckpt) stays and is no resume point (before: int() of its name failed)."""
    output_dir, env = tmp_path / "run", slurm_env(tmp_path, 0)
    named = f"resume={output_dir / 'hpc_ckpt_1.ckpt'}"
    for step, resume in ((4, "resume=auto"), (8, named)):
        stopped = train(output_dir, env, "-c", SIGNALLED_RUN, str(step), str(int(signal.SIGUSR1)), resume)
        assert stopped.returncode == 0, stopped.stderr[-4000:]
        shutil.copy(output_dir / f"hpc_ckpt_{step // 4}.ckpt", output_dir / "hpc_ckpt_backup.ckpt")
    assert sorted(path.name for path in output_dir.glob("hpc_ckpt_*")) == [
        "hpc_ckpt_2.ckpt",
        "hpc_ckpt_backup.ckpt",
    ]
    resumed = train(output_dir, env, "train.py", named)  # the job's command again, as SLURM restarts it
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "a later requeue of this run replaced it" in resumed.stderr
    assert outcome(output_dir) == outcome(uninterrupted)


@pytest.mark.slow
def test_a_requeued_run_without_a_best_checkpoint_scores_its_final_weights(tmp_path):
    """Review: with ckpt_path=None, Lightning on SLURM loads the newest hpc_ckpt_* of the run folder
    itself, so the resumed run's final validation scored the weights of the requeue (step 4, as the
    final weights), and a user's hpc_ckpt_backup.ckpt stopped a fresh run (int() of its name)."""
    env, unmonitored = slurm_env(tmp_path, 0), "callbacks.checkpoint.monitor=null"
    expected = tmp_path / "uninterrupted"
    assert train(expected, env, "train.py", unmonitored).returncode == 0
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    (output_dir / "hpc_ckpt_backup.ckpt").write_text("a user's copy")
    stopped = train(output_dir, env, "-c", SIGNALLED_RUN, "4", str(int(signal.SIGUSR1)), unmonitored)
    assert stopped.returncode == 0, stopped.stderr[-4000:]
    resumed = train(output_dir, env, "train.py", unmonitored)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert outcome(output_dir)[0] == outcome(expected)[0]


# Sends SIGUSR1 to the run itself before its fit (as its data is read), at its end (after the last step
# boundary) or after it (in its final validation).
OUTSIDE_TRAINING = """
import os, signal, sys
from datamodules.datamodule import GroundingDataModule
from lightning_modules.grounding_module import GroundingModule
from timerefine import train
if sys.argv[1] == "before":
    setup = GroundingDataModule.setup
    def signalled(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGUSR1)
        return setup(self, *args, **kwargs)
    GroundingDataModule.setup = signalled
elif sys.argv[1] == "end":
    GroundingModule.on_train_end = lambda self: os.kill(os.getpid(), signal.SIGUSR1)
else:
    step = GroundingModule.validation_step
    def signalled(self, batch, batch_idx):
        if self.trainer.state.fn == "validate" and batch_idx == 0:
            os.kill(os.getpid(), signal.SIGUSR1)
        return step(self, batch, batch_idx)
    GroundingModule.validation_step = signalled
sys.exit(train.main(sys.argv[2:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize(("when", "scontrol_status"), [("before", 0), ("end", 0), ("after", 0), ("after", 1)])
def test_the_signal_outside_training_requeues_the_job_at_once(tmp_path, uninterrupted, when, scontrol_status):
    """Before (review): the signal before the fit ended the process (the job failed, not requeued), and
    at its end or after it was only noted, so the job ran into its time limit. Now the job is requeued
    at once; where the requeue fails, it runs on."""
    output_dir, env = tmp_path / "run", slurm_env(tmp_path, scontrol_status)
    signalled = train(output_dir, env, "-c", OUTSIDE_TRAINING, when)
    assert signalled.returncode == 0, signalled.stderr[-4000:]
    if scontrol_status:
        assert "scontrol requeue 77 failed (exit status 1" in signalled.stderr
        assert outcome(output_dir) == outcome(uninterrupted)  # it ran on to its end
        return
    assert "requeued job 77 at once" in signalled.stderr
    assert not (output_dir / "metrics.json").exists()
    trained = (output_dir / "checkpoints").exists()
    assert trained == (when != "before")
    requeued = train(output_dir, env, "train.py")
    assert requeued.returncode == 0, requeued.stderr[-4000:]
    assert ("resuming from" in requeued.stderr) == trained
    assert outcome(output_dir) == outcome(uninterrupted)


@pytest.mark.parametrize(
    "job", [{}, {"SLURM_NTASKS": "1"}, {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "interactive"}, SLURM]
)
def test_the_handler_outside_training_is_set_where_lightning_runs_a_slurm_job(monkeypatch, job):
    """Review: set wherever SLURM_JOB_ID was, it also requeued a job Lightning does not run as one (named
    bash or interactive) in the middle of training, where no SlurmRequeue takes the signal over."""
    for name in [n for n in os.environ if n.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    for name, value in job.items():
        monkeypatch.setenv(name, value)
    assert in_slurm_job() == SLURMEnvironment.detect()


def test_only_an_hpc_checkpoint_older_than_the_newest_reads_as_removed(tmp_path):
    """Review: a mistyped name (hpc_ckpt_12 for hpc_ckpt_2) continued from another checkpoint in silence."""
    (tmp_path / "hpc_ckpt_2.ckpt").touch()
    assert removed_by_requeue(tmp_path / "hpc_ckpt_1.ckpt", tmp_path)
    for name in (
        "hpc_ckpt_12.ckpt",
        "hpc_ckpt_1.pt",
        "hpc_ckpt_typo",
        "hpc_ckpt_2.ckpt",
        "x/hpc_ckpt_1.ckpt",
    ):
        assert not removed_by_requeue(tmp_path / name, tmp_path)
