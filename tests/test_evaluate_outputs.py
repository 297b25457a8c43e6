"""What an evaluation writes to ``<run>/eval/<name>/``: its own scores only, under the conventions that
made them, without warnings meant for a resumed fit."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests import launched

RUN = [
    "experiment=tiny",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "callbacks.refinement_trace=0",
]


def command(*argv: str) -> subprocess.CompletedProcess:
    return launched.run(list(argv), timeout=300)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("evaluate_outputs") / "run"
    trained = command("train.py", *RUN, f"output_dir={output_dir}")
    assert trained.returncode == 0, trained.stderr[-4000:]
    return output_dir


@pytest.mark.slow
def test_an_evaluation_run_again_under_its_name_leaves_only_its_own_scores(run):
    """Before: ``logs/csv/metrics.csv`` gained a row at each evaluation of one ``--name``, both at step
    0 beside a ``metrics.json`` of the last one only, and each evaluation warned that the run's best
    checkpoint lay outside "this run's folder" (found by a review)."""
    first = command("evaluate.py", str(run), "--name", "again", "eval.protocol=vtimellm")
    assert first.returncode == 0, first.stderr[-4000:]
    (run / "eval" / "again" / "logs").mkdir(exist_ok=True)  # as an evaluation before this change left it
    second = command("evaluate.py", str(run), "--name", "again")
    assert second.returncode == 0, second.stderr[-4000:]
    for evaluation in (first, second):
        assert "outside this run's folder" not in evaluation.stderr
        assert "dirpath has changed" not in evaluation.stderr  # Lightning's, when the paths are not moved
    folder = run / "eval" / "again"
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "metrics.json", "predictions"]
    assert json.loads((folder / "metrics.json").read_text())["eval/protocol"] == "exact"
