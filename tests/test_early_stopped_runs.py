"""A run that early stopping ended is done training: run again (to test otherwise) or resumed after a
kill in its final test, it trains no further and ends as the run that stopped."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests import launched
from tests.test_resume_runs import signalled_run

ENV = dict(os.environ, OMP_NUM_THREADS="1")
STOPPED_AT = 30  # val/mIoU is best at step 20 and no better at 30: patience 1 stops the run there
RUN = [
    "experiment=tiny",
    "trainer.max_steps=80",
    "callbacks.early_stopping={monitor: val/mIoU, mode: max, patience: 1}",
    "data.eval_batch_size=4",  # two test batches: a test can be stopped half-way
    "logger.tensorboard=false",
    "callbacks.refinement_trace=0",
]


def train(output_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return launched.run(["train.py", *RUN, f"output_dir={output_dir}", *extra], env=ENV, timeout=300)


def outputs(output_dir: Path) -> tuple[dict, list[dict[str, str]]]:
    """``metrics.json`` and the rows of ``metrics.csv``."""
    with open(output_dir / "logs" / "csv" / "metrics.csv", newline="") as file:
        return json.loads((output_dir / "metrics.json").read_text()), list(csv.DictReader(file))


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Path:
    """In a fresh interpreter: the runs compared with it are forked, with another hash seed."""
    output_dir = tmp_path_factory.mktemp("early_stopped") / "run"
    result = launched.fresh(["train.py", *RUN, f"output_dir={output_dir}"], env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert outputs(output_dir)[0]["global_step"] == STOPPED_AT
    return output_dir


def test_an_early_stopped_run_keeps_only_its_best_and_last_checkpoints(stopped):
    """Before: best-step10.ckpt stayed beside best-step20.ckpt (found by a docs audit): the last.ckpt
    Lightning writes when a fit ends without one did not remove the best checkpoints it replaced."""
    assert sorted(path.name for path in (stopped / "checkpoints").iterdir()) == [
        "best-step20.ckpt",
        "last.ckpt",
    ]


@pytest.mark.slow
def test_an_early_stopped_run_tested_again_trains_no_further(stopped, tmp_path):
    """Before: it resumed from last.ckpt, trained steps 30-40 and validated again; metrics.json said 40."""
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    result = train(run, "trainer.limit_test_batches=1")
    assert result.returncode == 0, result.stderr[-4000:]
    metrics, rows = outputs(run)
    assert metrics["global_step"] == STOPPED_AT and metrics["test/coverage"] < 100
    assert f"stopped early at step {STOPPED_AT}" in result.stderr
    assert rows == outputs(stopped)[1]  # no training or validation row added


@pytest.mark.slow
def test_an_early_stopped_run_killed_in_its_test_ends_as_the_uninterrupted_one(stopped, tmp_path):
    """Before: resumed, it trained steps 30-40, so metrics.json said 40 and metrics.csv had more rows.
    (Lightning finishes a test that a SIGTERM interrupts: the kill here is ``kill -9``.)"""
    run = tmp_path / "run"
    killed = signalled_run("test_step", STOPPED_AT, 1, signal.SIGKILL, [*RUN, f"output_dir={run}"])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    assert not (run / "metrics.json").exists()
    result = train(run)
    assert result.returncode == 0, result.stderr[-4000:]
    assert outputs(run) == outputs(stopped)


@pytest.mark.slow
def test_an_early_stopped_run_is_not_given_another_length(stopped, tmp_path):
    """Before: it warned of a learning-rate curve it never trained on and rewrote config.yaml to the
    new length, while it stopped where it had."""
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    before = (run / "config.yaml").read_text()
    result = train(run, "trainer.max_steps=120")
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()[-1:]
    assert line.startswith(
        f"error: trainer.max_steps=120: {run / 'checkpoints' / 'last.ckpt'} stopped early at step 30"
    )
    assert line.endswith(
        "trains no further; init_from_run=<its run> in another output_dir trains on from its weights"
    )
    assert (run / "config.yaml").read_text() == before
