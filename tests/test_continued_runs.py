"""A finished run run again (to test otherwise, or with other limits) is refused in one line before
anything is written when its limits stop short of its checkpoint or its best checkpoint cannot be read."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import lightning as L
import pytest
from omegaconf import OmegaConf

import train
from timerefine.pipeline.previous_run import (
    ChangedSettingsError,
    check_reaches_epochs,
    epochs_reached,
    validation_change,
)

RUN = ["experiment=tiny", "trainer.accelerator=cpu", "logger.csv=false"]  # builtin_run's: 20 steps


@pytest.fixture
def run(builtin_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(builtin_run, copy, ignore=shutil.ignore_patterns("eval"))
    return copy


def snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Every file under ``folder``: (inode, size, mtime), which a rewrite changes."""
    return {
        p.relative_to(folder).as_posix(): (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


def refused(argv: list[str], capsys) -> str:
    """The one line ``train.main`` stops with (exit code 2)."""
    assert train.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.slow
def test_max_epochs_below_the_checkpoint_is_refused(run, capsys):
    """Before: rc 0, "max_epochs=1 reached", tested again, and config.yaml said max_epochs 1 (16 steps)
    for the model trained 20 steps."""
    before, last = snapshot(run), run / "checkpoints" / "last.ckpt"
    line = refused([*RUN, f"output_dir={run}", "trainer.max_steps=-1", "trainer.max_epochs=1"], capsys)
    assert line == (
        f"error: trainer.max_epochs=1: {last} is at step 20 already (in epoch 2), and a "
        "run continues to at least that step; give trainer.max_epochs >= 2, or another output_dir for a "
        "shorter run"
    )
    assert snapshot(run) == before


def truncated(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[:1000])
    return path


@pytest.mark.slow
def test_a_corrupt_best_checkpoint_stops_a_rerun_before_writing(run, capsys):
    """Before: a full fit attempt, then a PytorchStreamReader traceback from trainer.validate, exit 1,
    and metrics.json deleted."""
    best = truncated(run / "checkpoints" / "best-step20.ckpt")
    before = snapshot(run)
    line = refused([*RUN, f"output_dir={run}", "trainer.limit_test_batches=1"], capsys)
    assert line.startswith(f"error: checkpoint {best} cannot be read (")
    assert f"the best checkpoint {run / 'checkpoints' / 'last.ckpt'} records, which the run tests" in line
    assert snapshot(run) == before


@pytest.mark.slow
def test_a_best_checkpoint_unreadable_by_the_test_is_one_line(run, capsys, monkeypatch):
    """Before: a PytorchStreamReader traceback from trainer.validate, exit 1."""
    best, fit = run / "checkpoints" / "best-step20.ckpt", L.Trainer.fit

    def fit_then_damage(trainer: L.Trainer, *args, **kwargs) -> None:
        fit(trainer, *args, **kwargs)
        truncated(best)

    monkeypatch.setattr(L.Trainer, "fit", fit_then_damage)
    line = refused([*RUN, f"output_dir={run}", "trainer.limit_test_batches=1"], capsys)
    assert line.startswith(f"error: checkpoint {best} cannot be read (")
    assert "the best checkpoint this run records, which the run tests" in line


def progress(processed: int, started: int, batches: int, last_batch: bool) -> dict:
    """A checkpoint's fit loop state: epochs processed and started, batches of the current epoch."""
    epochs = {"ready": started, "started": started, "processed": processed, "completed": processed}
    batch = {"ready": batches, "started": batches, "processed": batches, "completed": batches}
    loop = {"epoch_progress": {"current": epochs}, "epoch_loop.batch_progress": {"current": batch}}
    loop["epoch_loop.batch_progress"]["is_last_batch"] = last_batch
    return {"loops": {"fit_loop": loop}, "global_step": 16}


@pytest.mark.parametrize(
    ("state", "reached"),
    [
        (progress(1, 2, 4, False), (1, True)),  # step 20 of 16-step epochs
        (progress(0, 1, 16, True), (1, False)),  # written after the last batch of epoch 1
        (progress(1, 1, 16, True), (1, False)),  # written at the end of epoch 1
        (progress(2, 2, 14, False), (2, False)),  # an early stop ended epoch 2 after 14 batches
    ],
)
def test_epochs_reached_counts_a_trained_last_batch_as_its_epoch(state, reached):
    assert epochs_reached(state) == reached


def test_max_epochs_may_end_where_the_checkpoint_is():
    check_reaches_epochs(1, Path("last.ckpt"), progress(0, 1, 16, True), given=False)
    check_reaches_epochs(-1, Path("last.ckpt"), progress(5, 6, 3, False), given=False)
    with pytest.raises(
        ChangedSettingsError, match=r"max_epochs=0: .* \(at the end of epoch 1\), .* give trainer"
    ):
        check_reaches_epochs(0, Path("last.ckpt"), progress(0, 1, 16, True), given=False)


def test_a_longer_continued_run_warns_that_its_schedule_changed(run, caplog):
    """Before: trained on with the learning rate of a 40-step curve from step 20 (back up from the
    20-step curve's floor) and said nothing, while its config.yaml reads as a 40-step run's."""
    with caplog.at_level(logging.WARNING, logger="timerefine.pipeline.previous_run"):
        assert train.main([*RUN, "trainer.max_steps=24", f"output_dir={run}"]) == 0
    assert caplog.messages == [
        "trainer.max_steps 20 -> 24: from step 20 on, the learning rate follows the new length's curve "
        "(warmup and cosine decay span the whole run), so this run differs from one trained that long "
        "from the start"
    ]


def test_a_continued_run_on_another_validation_subset_warns_that_its_best_scores_were_taken_on_the_old(
    run, caplog
):
    """Before: validated 1 batch from step 20 on and compared its scores, in silence, with the best
    val/mIoU taken on the whole validation split (the best checkpoint kept or replaced by it)."""
    argv = [*RUN, "trainer.max_steps=24", "trainer.limit_val_batches=1", f"output_dir={run}"]
    with caplog.at_level(logging.WARNING, logger="timerefine.pipeline.previous_run"):
        assert train.main(argv) == 0
    assert caplog.messages[-1] == (
        "trainer.limit_val_batches null -> 1: this run's validation scores are compared, by the best "
        "checkpoint, with the best score taken by step 20 on the other validation subset"
    )


@pytest.mark.parametrize(
    ("before", "now", "warned"),
    [(1, 1.0, True), (1.0, 1, True), (None, 1.0, False), (None, None, False), (0.5, 0.25, True)],
)
def test_validation_subsets_are_compared_as_lightning_reads_them(before, now, warned):
    """The diff review: 1 (one batch) and 1.0 (all of them) were taken for one subset, and null and
    1.0 (both all) for two."""
    state = {
        "global_step": 20,
        "hyper_parameters": {"config": {"trainer": {"limit_val_batches": before}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val/mIoU'}": {"best_model_score": 15.0}},
    }
    cfg = OmegaConf.create({"trainer": {"limit_val_batches": now, "max_steps": 24}})
    assert (validation_change(state, cfg) is not None) == warned
