"""Real SLURM jobs on the local test cluster: a 2-task CPU DDP run, a sweep as a job array, and runs (1 and 2
tasks) signalled mid-training that save an HPC checkpoint, requeue themselves and resume to the same end."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.slurm_cluster import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 60
# A tiny run: small LM and data, no validation/test decoding, a checkpoint every 10 steps (the requeue
# test waits for the first one before signalling, so the signal lands mid-training).
TINY = [
    "experiment=tiny",
    f"trainer.max_steps={MAX_STEPS}",
    "model.saliency.projector_steps=0",
    "trainer.limit_val_batches=0",
    "test=false",
    "callbacks.checkpoint.monitor=null",
    "callbacks.checkpoint.last_every_n_steps=10",
]


class Submitter:
    """Submits train.py through timerefine/tools/slurm_submit.py with logs and run dirs under one temp dir."""

    def __init__(self, cluster: SlurmCluster, root: Path) -> None:
        self.cluster, self.root = cluster, root

    def submit(self, name: str, overrides: list[str], *options: str) -> str:
        cmd = [
            sys.executable,
            "-m",
            "timerefine.tools.slurm_submit",
            "--job-name",
            name,
            "--time",
            "10",
            "--cpus-per-task",
            "1",
            "--python",
            sys.executable,
            "--workdir",
            str(REPO),
            "--log-dir",
            str(self.root / "logs"),
            "--runs-dir",
            str(self.root / "runs"),
            *options,
            "--",
            *overrides,
        ]
        proc = subprocess.run(cmd, env=self.cluster.env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    def run_dir(self, name: str, job_id: str, index: int = 0) -> Path:
        return self.root / "runs" / name / f"{job_id}_{index}"

    def report(self, job_id: str) -> str:
        """Job logs plus daemon logs, for assertion messages."""
        logs = sorted((self.root / "logs").glob(f"*-{job_id}*"))
        return "\n".join(f"== {p.name}\n{p.read_text()[-4000:]}" for p in logs) + "\n" + self.cluster.logs()

    def wait_ok(self, job_id: str, tasks: int = 1, timeout: float = 300) -> list[dict[str, str]]:
        records = self.cluster.wait(job_id, timeout=timeout, expect_tasks=tasks)
        states = [(r["JobState"], r["ExitCode"]) for r in records]
        assert states == [("COMPLETED", "0:0")] * tasks, f"{states}\n{self.report(job_id)}"
        return records


def metrics(run_dir: Path) -> dict[str, float]:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def submitter(slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> Submitter:
    return Submitter(slurm_cluster, tmp_path_factory.mktemp("slurm-jobs"))


@pytest.fixture(scope="module")
def ddp_run(submitter: Submitter) -> Path:
    """An uninterrupted 2-task (CPU DDP over gloo) run; the requeue test compares against it."""
    job_id = submitter.submit("ddp", TINY, "--tasks-per-node", "2")
    submitter.wait_ok(job_id)
    return submitter.run_dir("ddp", job_id)


@pytest.mark.distributed
def test_two_task_ddp_job(submitter: Submitter, ddp_run: Path) -> None:
    assert metrics(ddp_run)["global_step"] == MAX_STEPS
    config = (ddp_run / "config.yaml").read_text()
    assert "devices: 2" in config and "strategy: ddp" in config and "accelerator: cpu" in config


def test_sweep_runs_as_job_array(submitter: Submitter) -> None:
    job_id = submitter.submit("sweep", [*TINY, "trainer.max_steps=20", "seed=1,2"], "--max-parallel", "2")
    records = submitter.wait_ok(job_id, tasks=2)
    assert sorted(r["ArrayTaskId"] for r in records) == ["0", "1"]
    for index, seed in enumerate((1, 2)):
        run_dir = submitter.run_dir("sweep", job_id, index)
        assert metrics(run_dir)["global_step"] == 20, submitter.report(job_id)
        assert f"\nseed: {seed}\n" in "\n" + (run_dir / "config.yaml").read_text()


def _wait_for(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout}s"
        time.sleep(0.2)


def _requeued(cluster: SlurmCluster, job_id: str, timeout: float) -> bool:
    """Whether the job got requeued (Restarts >= 1) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cluster.jobs(job_id)[0]["Restarts"] != "0":
            return True
        time.sleep(0.5)
    return False


@pytest.mark.parametrize("tasks", [1, pytest.param(2, marks=pytest.mark.distributed)])
def test_signal_requeues_and_resumes(submitter: Submitter, ddp_run: Path, tasks: int) -> None:
    cluster, name = submitter.cluster, f"requeue{tasks}"
    job_id = submitter.submit(name, TINY, "--tasks-per-node", str(tasks))
    run_dir = submitter.run_dir(name, job_id)
    _wait_for(run_dir / "checkpoints" / "last.ckpt", timeout=180)  # training is past step 10
    # What --signal=USR1@90 does near the time limit: USR1 to every srun task; train.py then saves
    # hpc_ckpt_1.ckpt at the next step boundary and runs `scontrol requeue` (callbacks/slurm_requeue.py).
    cluster.run("scancel", "--signal=USR1", job_id)
    if not _requeued(cluster, job_id, timeout=30):  # a DDP deadlock shows up here, not as a 5-minute hang
        cluster.run("scancel", job_id, check=False)
        pytest.fail(f"no requeue within 30 s of SIGUSR1\n{submitter.report(job_id)}")
    submitter.wait_ok(job_id, timeout=300)

    hpc_step = torch.load(run_dir / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=False)["global_step"]
    assert 10 <= hpc_step < MAX_STEPS, f"signal not mid-training: step {hpc_step}"
    log = (submitter.root / "logs" / f"{name}-{job_id}.err").read_text()
    assert "Restoring states from the checkpoint path at" in log and "hpc_ckpt_1.ckpt" in log, (
        submitter.report(job_id)
    )
    assert (submitter.root / "logs" / f"{name}-{job_id}.out").read_text().count(" restart 1 ") == 1
    assert metrics(run_dir)["global_step"] == metrics(ddp_run)["global_step"] == MAX_STEPS
    # Both loggers continue the run: steps from before the signal and after the resume.
    events = EventAccumulator(str(run_dir / "logs" / "tensorboard"))
    events.Reload()
    with (run_dir / "logs" / "csv" / "metrics.csv").open() as file:
        csv_steps = [int(row["step"]) for row in csv.DictReader(file) if row.get("train/loss")]
    for steps in ([event.step for event in events.Scalars("train/loss")], csv_steps):
        assert min(steps) < hpc_step <= max(steps) and max(steps) >= MAX_STEPS - 5, steps
        assert len(steps) == len(set(steps)), f"steps logged twice: {steps}"
