"""What timerefine-slurm-submit refuses before anything queues, found by running real jobs (review): a
resume a requeue fails on or that does not exist, sbatch options that would contradict the Trainer's,
paths sbatch or the shell would split, a --workdir without train.py, --max-parallel without a sweep, a
sweep of identical runs."""

from __future__ import annotations

import subprocess

import pytest

from tests.test_slurm_submit import fake_bin, render, sbatch_lines
from timerefine.tools import slurm_submit
from timerefine.tools.sbatch_template import extra_option_error
from timerefine.tools.slurm_submit import JobSpec

DRY = ["--dry-run", "--", "experiment=tiny"]


def refused(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """The one error line ``argv`` gets (exit status 2, nothing on stdout; argparse's usage aside)."""
    try:
        status = slurm_submit.main(argv)
    except SystemExit as exit:  # parser.error, for a mistake in the tool's own flags
        status = exit.code
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if not line.startswith(("usage:", " "))]
    assert status == 2 and captured.out == "" and len(lines) == 1, captured.err
    return lines[0]


def test_resume_null_is_refused_for_a_requeued_job(capsys):
    """Before: queued, and the requeued job failed at once: its run folder held the checkpoints it wrote.
    (A checkpoint path is kept: a restart continues from the run's own later checkpoint.)"""
    line = refused(capsys, [*DRY, "resume=null"])
    assert line.startswith("config error: resume=null: a requeued job continues") and "--no-requeue" in line


def test_a_resume_path_must_exist(capsys):
    assert slurm_submit.main(["--no-requeue", *DRY, "resume=null"]) == 0
    capsys.readouterr()
    line = refused(capsys, [*DRY, "resume=missing.ckpt"])
    assert line == "config error: resume=missing.ckpt: no such checkpoint file"
    elsewhere = ["--dry-run", "--workdir", "/cluster/proj", "--", "resume=/cluster/runs/a/hpc_ckpt_1.ckpt"]
    assert slurm_submit.main(elsewhere) == 0  # a script for another machine, where the file may be


@pytest.mark.parametrize(
    ("extra", "instead"),
    [("--ntasks-per-node=3", "--gpus-per-node/--tasks-per-node"), ("#SBATCH -N 3", "--nodes"),
     ("--array=0-3", "a sweep"), ("--chdir /x", "--workdir")],
)  # fmt: skip
def test_extra_sbatch_cannot_set_what_the_tool_renders(capsys, extra, instead):
    """Before: --extra-sbatch=--ntasks-per-node=3 queued 3 tasks with trainer.devices=1."""
    line = refused(capsys, [f"--extra-sbatch={extra}", *DRY])
    assert "is rendered by the tool" in line and f"; use {instead}" in line


@pytest.mark.parametrize(
    ("extra", "gpus", "allowed"),
    [("--gres=gpu:a100:8", 8, True), ("--gres=gpu:a100:4", 8, False), ("--gres=lscratch:200", 8, False),
     ("--gres=gpu:8,lscratch:1", 8, True), ("--gres=lscratch:200", 0, True), ("--gpus-per-task=1", 8, True),
     ("--gpus-per-task=2", 8, False), ("-c4", 0, False), ("--exclusive", 0, True), ("-C h100", 8, True),
     ("--gres=gpu:8(S:0-1)", 8, True), ("--gres=gpu:a:2,gpu:b:2", 4, True), ('--gres="gpu:8"', 8, True),
     ("--gres=gpu:8", 0, False)],
)  # fmt: skip
def test_extra_sbatch_may_type_gpus_and_add_resources_that_agree(extra, gpus, allowed):
    """Review: --gres=gpu:a100:8 (a GPU type) was refused, though it agrees with --gpus-per-node 8."""
    assert (extra_option_error(extra, gpus) is None) == allowed


def test_paths_with_spaces_are_quoted_as_sbatch_and_bash_read_them(tmp_path):
    """Before: ``#SBATCH --chdir=/tmp/my dir``, which sbatch refuses (``Invalid directive ...: dir``), and
    ``RUN_DIR="<runs-dir>/..."``, which broke on a double quote and expanded ``$HOME`` unchecked."""
    spec = JobSpec(workdir="/w/my dir", log_dir="slurm logs", runs_dir="$HOME/my runs", time="5")
    script = render(spec)
    assert {'#SBATCH --chdir="/w/my dir"', '#SBATCH --output="slurm logs/%x-%j.out"'} <= set(
        sbatch_lines(script)
    )
    run_dir = next(line for line in script.splitlines() if line.startswith("RUN_DIR="))
    shown = subprocess.run(
        ["bash", "-c", f'{run_dir}; echo "$RUN_DIR"'],
        env={"SLURM_JOB_ID": "42", "HOME": "/home/me"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert shown.stdout == "$HOME/my runs/timerefine/42_0\n"  # as typed, as the tool checked it


def test_a_path_with_a_double_quote_is_refused(capsys):
    assert refused(capsys, ["--log-dir", 'a"b', *DRY]).endswith("a path with a double quote or a line break")


def test_a_workdir_without_train_py_is_refused_before_submitting(tmp_path, capsys, monkeypatch):
    """Before: queued, then failed with python: can't open file '<workdir>/train.py'."""
    monkeypatch.setenv("PATH", fake_bin(tmp_path, "sbatch", 'echo "Submitted batch job 1"')["PATH"])
    line = refused(capsys, ["--workdir", str(tmp_path), "--", "experiment=tiny"])
    assert line == f"error: --workdir {tmp_path}: no train.py there (the job runs python train.py in it)"


def test_max_parallel_needs_a_sweep(capsys):
    assert "limits the tasks of a sweep" in refused(capsys, ["--max-parallel", "2", *DRY])
    assert slurm_submit.main(["--max-parallel", "2", *DRY, "seed=1,2,3"]) == 0


@pytest.mark.parametrize(
    ("sweep", "refusal"),
    [(["seed=1,1"], "repeats a value"), (["seed=1,2", "seed=3,4"], "seed is given more than once")],
)
def test_a_sweep_of_runs_that_would_be_the_same_is_refused(capsys, sweep, refusal):
    """Before: seed=1,2 seed=3,4 queued 4 tasks, two by two the same (the last seed counts)."""
    assert refusal in refused(capsys, [*DRY, *sweep])
