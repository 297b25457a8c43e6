"""A run continues only with the settings it started with: train.py in the folder of a killed or
finished run, with other model or data settings, stops with one line before it writes anything; with
the same settings it resumes, starts over without repeated log rows, or says the run is done."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import train
from tests import launched
from timerefine.pipeline.config import load_config
from timerefine.pipeline.config_diff import changes
from timerefine.pipeline.previous_run import MAY_CHANGE

ENV = dict(os.environ, OMP_NUM_THREADS="1")
RUN = [
    "experiment=tiny",
    "trainer.max_steps=6",
    "model.saliency.projector_steps=0",
    "trainer.val_check_interval=3",
    "trainer.log_every_n_steps=1",
    "logger.tensorboard=false",
    "callbacks.refinement_trace=0",
]
EVERY_2 = "callbacks.checkpoint.last_every_n_steps=2"  # the run killed after a checkpoint


def overrides(output_dir: Path, *extra: str) -> list[str]:
    return [*RUN, f"output_dir={output_dir}", *extra]


def kill_when(output_dir: Path, ready: Callable[[], bool], *extra: str) -> None:
    """Start ``train.py`` and ``kill -9`` it as soon as ``ready()``."""
    log = output_dir.parent / f"{output_dir.name}.log"
    process = launched.Launched(["train.py", *overrides(output_dir, *extra)], env=ENV, log=log)
    while not ready():
        assert process.poll() is None, "the run ended before it was killed"
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.communicate()


def cli(argv: list[str]) -> subprocess.CompletedProcess:
    return launched.run(["train.py", *argv], env=ENV, timeout=300)


def csv_rows(output_dir: Path) -> list[dict[str, str]]:
    path = output_dir / "logs" / "csv" / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def repeated_rows(output_dir: Path) -> list[tuple[str, frozenset[str]]]:
    """(step, logged keys) that appear in more than one row of metrics.csv."""
    kinds = Counter((r["step"], frozenset(k for k, v in r.items() if v)) for r in csv_rows(output_dir))
    return [kind for kind, count in kinds.items() if count > 1]


def snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Every file under ``folder``: (inode, size, mtime), which a rewrite changes."""
    return {
        p.relative_to(folder).as_posix(): (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture(scope="module")
def killed_after_checkpoint(tmp_path_factory) -> Path:
    """A run killed right after its first ``last.ckpt`` (step 2 of 6)."""
    run = tmp_path_factory.mktemp("killed_after_checkpoint") / "run"
    last = run / "checkpoints" / "last.ckpt"
    kill_when(run, last.is_file, EVERY_2)
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 2
    return run


@pytest.fixture(scope="module")
def killed_before_checkpoint(tmp_path_factory) -> Path:
    """A run killed after logging its step 2, before any ``last.ckpt`` (its first is at step 6)."""
    run = tmp_path_factory.mktemp("killed_before_checkpoint") / "run"
    kill_when(run, lambda: any(r.get("step") == "2" for r in csv_rows(run)))  # polled mid-write
    assert not (run / "checkpoints" / "last.ckpt").exists()
    return run


def copy(run: Path, tmp_path: Path) -> Path:
    copied = tmp_path / "run"
    shutil.copytree(run, copied)
    return copied


def refused(argv: list[str], capsys) -> str:
    """The line ``train.main`` stops with (exit code 2)."""
    assert train.main(argv) == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error
    return error.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "change, shown",
    [
        ("model.lm.tiny.hidden_size=48", "model.lm.tiny.hidden_size: 32 -> 48"),  # was a RuntimeError
        ("model.lora.enabled=true", "model.lora.enabled: false -> true"),  # was a RuntimeError
        ("model.refine.steps=1", "model.refine.steps: 3 -> 1"),  # was accepted: K=3 and K=1 in one run
    ],
)
def test_resume_with_other_model_settings_stops_before_writing(
    killed_after_checkpoint, tmp_path, capsys, change, shown
):
    run = copy(killed_after_checkpoint, tmp_path)
    before = snapshot(run)
    line = refused(overrides(run, EVERY_2, change), capsys)
    assert line.startswith(f"error: {run / 'config.yaml'} was written by a run with other settings (")
    assert shown in line and all(key in line for key in MAY_CHANGE)
    assert snapshot(run) == before  # config.yaml, tokenizer/, metrics.csv, checkpoints: untouched


def test_resume_from_another_runs_checkpoint_with_other_settings_stops(
    killed_after_checkpoint, tmp_path, capsys
):
    last = killed_after_checkpoint / "checkpoints" / "last.ckpt"
    new = tmp_path / "new"
    line = refused(overrides(new, EVERY_2, f"resume={last}", "model.lora.enabled=true"), capsys)
    assert line.startswith(f"error: {last} was written by a run with other settings (model.lora.enabled: ")
    assert not new.exists()


@pytest.mark.parametrize("resume", ["auto", "another run's"])
def test_resume_with_fewer_steps_than_the_checkpoint_reached_stops(
    killed_after_checkpoint, tmp_path, capsys, resume
):
    """Before: Lightning stopped at once ("max_steps=1 reached"), tested the step-2 model and
    config.yaml said max_steps: 1 beside metrics.json's global_step 2."""
    run, last = copy(killed_after_checkpoint, tmp_path), killed_after_checkpoint / "checkpoints" / "last.ckpt"
    before = snapshot(run)
    output_dir, extra = (run, []) if resume == "auto" else (tmp_path / "new", [f"resume={last}"])
    line = refused(overrides(output_dir, EVERY_2, "trainer.max_steps=1", *extra), capsys)
    at = run / "checkpoints" / "last.ckpt" if resume == "auto" else last
    shorter = (
        "another output_dir" if resume == "auto" else "init_from_run=<its run> to start from its weights"
    )
    assert line == (
        f"error: trainer.max_steps=1: {at} is at step 2 already, and a run continues to at least that "
        f"step; give trainer.max_steps >= 2, or {shorter} for a shorter run"
    )
    assert snapshot(run) == before and not (tmp_path / "new").exists()


def test_run_killed_before_a_checkpoint_with_other_settings_stops(killed_before_checkpoint, tmp_path):
    run = copy(killed_before_checkpoint, tmp_path)
    before = snapshot(run)
    result = cli(overrides(run, "model.refine.steps=2"))  # was accepted: metrics.csv mixed both runs
    assert result.returncode == 2
    [line] = (result.stdout + result.stderr).strip().splitlines()  # nothing else
    assert line.startswith(f"error: {run / 'config.yaml'} was written by a run with other settings ")
    assert "(model.refine.steps: 3 -> 2)" in line
    assert snapshot(run) == before


def test_run_killed_before_a_checkpoint_starts_over_without_repeated_rows(killed_before_checkpoint, tmp_path):
    run = copy(killed_before_checkpoint, tmp_path)
    assert repeated_rows(run) == [] and csv_rows(run)  # the killed attempt logged steps 0-2
    assert train.main(overrides(run)) == 0
    assert repeated_rows(run) == []
    assert [r["step"] for r in csv_rows(run) if r["train/loss"]] == [str(step) for step in range(6)]


def test_finished_run_run_again_is_done_and_may_train_longer(killed_after_checkpoint, tmp_path, caplog):
    run = copy(killed_after_checkpoint, tmp_path)
    assert train.main(overrides(run, EVERY_2)) == 0  # resumes at step 2 and finishes
    finished = snapshot(run)
    done = f"INFO train: {run} holds this run finished (metrics.json): nothing to do"
    result = cli(overrides(run, EVERY_2))  # was: validated and tested again, rows appended
    assert result.returncode == 0 and (result.stdout + result.stderr).strip().splitlines() == [done]
    caplog.set_level(logging.INFO)
    caplog.clear()
    assert train.main(overrides(run, EVERY_2, "data.num_workers=1", "trainer.enable_progress_bar=false")) == 0
    assert [f"INFO {r.name}: {r.getMessage()}" for r in caplog.records] == [done]
    assert snapshot(run) == finished  # nothing appended, nothing rewritten
    caplog.clear()  # was: validated again, and metrics.json rewritten without its test scores
    assert train.main(overrides(run, EVERY_2, "test=false")) == 0
    assert [f"INFO {r.name}: {r.getMessage()}" for r in caplog.records] == [done]
    assert snapshot(run) == finished
    caplog.clear()  # was: validated and tested again, its final rows logged one step lower
    assert train.main(overrides(run, EVERY_2, f"resume={run / 'checkpoints' / 'last.ckpt'}")) == 0
    assert [f"INFO {r.name}: {r.getMessage()}" for r in caplog.records] == [done]
    assert snapshot(run) == finished

    # trainer.max_steps may change: the run continues from its last.ckpt
    assert train.main(overrides(run, EVERY_2, "trainer.max_steps=8")) == 0
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 8
    trained = [int(r["step"]) for r in csv_rows(run) if r["train/loss"]]
    # the row of step 1 is missing when the kill came between its checkpoint and that row (README)
    assert trained in ([0, *range(2, 8)], list(range(8))) and repeated_rows(run) == []


def test_changes_name_added_removed_and_changed_leaves():
    old = {"model": {"lora": {"r": 16, "target_modules": ["q", "v"]}}, "seed": 0}
    new = {"model": {"lora": {"r": 16, "target_modules": ["q"]}}, "trainer": {"foo": 1}}
    assert changes(old, new) == {
        "model.lora.target_modules": (["q", "v"], ["q"]),
        "seed": (0, "(absent)"),
        "trainer.foo": ("(absent)", 1),
    }


def test_changes_tell_one_batch_from_all_of_them():
    """Lightning reads limit_*_batches=1 as one batch and 1.0 as all: a run tested on one batch was
    taken as finished with 1.0, and a resume could switch limit_train_batches between them."""
    old = {"trainer": {"limit_test_batches": 1, "logger": True, "devices": [0, 1]}, "seed": 0}
    new = {"trainer": {"limit_test_batches": 1.0, "logger": 1, "devices": [0, 1.0]}, "seed": 0}
    assert changes(old, new) == {
        "trainer.devices": ([0, 1], [0, 1.0]),
        "trainer.limit_test_batches": (1, 1.0),
        "trainer.logger": (True, 1),
    }


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty, or not a mapping of keys"),  # was: "written by a run with other settings" (every key)
        ("- a\n", "empty, or not a mapping of keys"),  # was: an OmegaConf traceback
        ("{{{ x\n", "not a run's config (while parsing"),  # was: a YAML scanner traceback
    ],
)
def test_a_half_written_config_in_the_output_dir_is_one_line(tmp_path, capsys, text, why):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(text)
    line = refused(overrides(run), capsys)
    assert line.startswith(f"error: {run / 'config.yaml'}: not a run's config") and why in line, line
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]


def test_a_saved_config_of_the_wrong_type_names_its_file(tmp_path, capsys):
    """Before: 'data.batch_size: Value 'four' ...' without saying which file holds it."""
    run = tmp_path / "run"
    run.mkdir()
    OmegaConf.save(load_config(overrides(run)), run / "config.yaml")
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("  batch_size: ", "  batch_size: four #", 1))
    line = refused(overrides(run), capsys)
    assert line.startswith(f"error: {config}: ") and "batch_size" in line, line


def as_trained_in_the_other_precision(last: Path) -> tuple[str, str]:
    """Rewrite ``last``'s recorded precision to the other one of auto's choices; (recorded, other)."""
    state = torch.load(last, map_location="cpu", weights_only=False)
    recorded = state["trainer_precision"]  # auto's choice here: 32-true for the tiny LM on a CPU
    state["trainer_precision"] = other = "bf16-mixed" if recorded == "32-true" else "32-true"
    torch.save(state, last)
    return recorded, other


def test_a_run_continues_in_the_precision_it_trained_in(killed_after_checkpoint, tmp_path, capsys):
    """Before: ``trainer.precision=auto`` was compared as written, so a run trained in bf16-mixed
    continued in 32-true where auto chose otherwise (a CPU without bf16, a requeue on another GPU),
    in silence (found by a review). The checkpoint records the precision it was trained in."""
    run = copy(killed_after_checkpoint, tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    here, other = as_trained_in_the_other_precision(last)  # as auto chose on another machine
    before = snapshot(run)
    line = refused(overrides(run, EVERY_2), capsys)
    assert line.startswith(
        f"error: {last} was trained in {other} precision, and trainer.precision=auto gives {here} here ("
    )
    assert line.endswith(f"give trainer.precision={other} to continue it, or use another output_dir")
    assert snapshot(run) == before
    assert train.main(overrides(run, EVERY_2, f"trainer.precision={other}")) == 0


def test_a_finished_run_is_done_whatever_precision_auto_gives_here(killed_after_checkpoint, tmp_path, caplog):
    """A finished run run again is done, not refused for the precision it would continue in (the
    diff review: the check came before the finished run was recognised)."""
    run = copy(killed_after_checkpoint, tmp_path)
    assert train.main(overrides(run, EVERY_2)) == 0
    as_trained_in_the_other_precision(run / "checkpoints" / "last.ckpt")
    metrics = (run / "metrics.json").read_text()
    with caplog.at_level(logging.INFO):
        assert train.main(overrides(run, EVERY_2)) == 0
    assert "holds this run finished (metrics.json): nothing to do" in caplog.text
    assert (run / "metrics.json").read_text() == metrics
