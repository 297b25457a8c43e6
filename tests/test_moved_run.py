"""A run folder copied or moved, then continued, keeps its best checkpoint and that checkpoint's score;
so does a run continued from another run's checkpoint in a new folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from callbacks.best_checkpoint import BestCheckpoint
from callbacks.last_checkpoint import LastCheckpoint, relocated
from timerefine.pipeline.best_checkpoint import recorded_best

SCORE_AFTER_STEP = {2: 1.0, 4: 3.0, 6: 2.0, 8: 0.0, 10: 4.0}  # validated every 2 steps; step 4's best to 8


class Scored(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.layer(batch).sum()

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val/score", SCORE_AFTER_STEP[self.global_step])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.ones(16, 1), batch_size=1)

    val_dataloader = train_dataloader


def fit(folder: Path, max_steps: int, resume: Path | None = None) -> ModelCheckpoint:
    """Fit with the run's two checkpoint callbacks (as timerefine/pipeline/build.py makes them),
    resuming from ``resume``, else from ``folder``'s last.ckpt when there is one; the best-checkpoint
    callback."""
    checkpoints = folder / "checkpoints"
    best = BestCheckpoint(checkpoints, "val/score", "max", 1)
    trainer = L.Trainer(
        max_steps=max_steps,
        val_check_interval=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        callbacks=[best, LastCheckpoint(checkpoints, 1)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=folder,
    )
    last = checkpoints / "last.ckpt"
    trainer.fit(Scored(), ckpt_path=resume or (last if last.is_file() else None))
    return best


@pytest.mark.parametrize("keep_original", [True, False], ids=["copied", "moved"])
def test_a_copied_or_moved_run_continues_with_its_best_checkpoint(tmp_path, keep_original):
    fit(tmp_path / "a", 6)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    if not keep_original:
        shutil.rmtree(tmp_path / "a")
    best = fit(tmp_path / "b", 8)  # step 8 validates worst of all
    checkpoints = (tmp_path / "b" / "checkpoints").resolve()
    assert best.best_model_path == str(checkpoints / "best-step4.ckpt")
    assert best.best_model_score == 3.0
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best-step4.ckpt", "last.ckpt"]


def test_another_runs_checkpoint_keeps_its_paths(tmp_path):
    """Resumed in a new folder that lacks the run's best checkpoint: not a copy, nothing to move; the
    folder becomes the new one's, so that Lightning keeps the best score (it drops it for another)."""
    other, new = tmp_path / "a" / "checkpoints", tmp_path / "new"
    other.mkdir(parents=True)
    new.mkdir()
    (other / "best.ckpt").touch()
    state = {"dirpath": str(other), "best_model_path": str(other / "best.ckpt"), "best_model_score": 1}
    assert relocated(state, str(new)) == state | {"dirpath": str(new)}  # was: state unchanged
    (new / "best.ckpt").touch()
    moved = relocated(state | {"best_k_models": {str(other / "best.ckpt"): 1}}, str(new))
    assert moved["best_model_path"] == str(new / "best.ckpt") and moved["dirpath"] == str(new)
    assert moved["best_k_models"] == {str(new / "best.ckpt"): 1}
    (new / "best.ckpt").unlink()
    (new / "best.ckpt").mkdir()  # FSDP saves a sharded folder
    assert relocated(state, str(new))["best_model_path"] == str(new / "best.ckpt")


def test_a_best_checkpoint_that_is_gone_is_forgotten(tmp_path):
    """Before: resumed from a checkpoint whose best file is gone (another run's folder deleted, a
    last.ckpt copied alone), a run trained to its end, then stopped at its test ("Checkpoint file not
    found") at every attempt; now its own validations choose its best (found by review)."""
    fit(tmp_path / "a", 6)
    a = (tmp_path / "a" / "checkpoints").resolve()
    shutil.copy(a / "last.ckpt", tmp_path / "copied.ckpt")
    shutil.rmtree(tmp_path / "a")
    with pytest.warns(UserWarning, match="that the resumed checkpoint records is gone"):
        best = fit(tmp_path / "b", 8, resume=tmp_path / "copied.ckpt")
    b = (tmp_path / "b" / "checkpoints").resolve()
    assert best.best_model_path == str(b / "best-step8.ckpt") and recorded_best(b) == b / "best-step8.ckpt"
    saved = {"dirpath": str(b), "best_model_path": str(b / "gone.ckpt"), "best_model_score": 2.0}
    assert relocated(saved, str(b))["best_model_score"] is None  # in its own folder too


def test_a_copied_run_without_its_best_checkpoint_says_whose_it_keeps(tmp_path):
    """Its best checkpoint deleted, a copied folder is not told from a new run continuing another's
    checkpoint: the original folder's best stays the best, now with a warning naming it (review: it
    was tested on it in silence)."""
    fit(tmp_path / "a", 6)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    (tmp_path / "b" / "checkpoints" / "best-step4.ckpt").unlink()
    original = (tmp_path / "a" / "checkpoints" / "best-step4.ckpt").resolve()
    with pytest.warns(UserWarning, match=f"the best checkpoint so far is {original}, outside this run's"):
        best = fit(tmp_path / "b", 8)
    assert best.best_model_path == str(original) and best.best_model_score == 3.0


def test_another_runs_best_score_loads_in_a_new_folder(tmp_path):
    saved = ModelCheckpoint(dirpath=tmp_path / "a", monitor="val/score", mode="max")
    best = str(tmp_path / "a" / "best-step4.ckpt")
    (tmp_path / "a").mkdir()
    Path(best).touch()
    saved.best_model_path, saved.best_model_score, saved.best_k_models = best, 3.0, {best: 3.0}
    saved.kth_best_model_path, saved.kth_value = best, 3.0
    new = ModelCheckpoint(dirpath=tmp_path / "b", monitor="val/score", mode="max")
    new.load_state_dict(relocated(saved.state_dict(), new.dirpath))
    assert new.best_model_score == 3.0 and new.best_model_path == best  # was: score None
    assert new.best_k_models == {best: 3.0} and new.kth_best_model_path == best


def test_continued_from_another_runs_checkpoint_keeps_its_best(tmp_path):
    """Before: the first validation in the new folder (step 8, the worst score) became "best", and the
    run was tested on it."""
    fit(tmp_path / "a", 6)
    a = (tmp_path / "a" / "checkpoints").resolve()
    before = sorted(p.name for p in a.iterdir())
    best = fit(tmp_path / "b", 8, resume=a / "last.ckpt")
    b = (tmp_path / "b" / "checkpoints").resolve()
    assert best.best_model_path == str(a / "best-step4.ckpt") and best.best_model_score == 3.0
    assert sorted(p.name for p in b.iterdir()) == ["last.ckpt"]
    assert recorded_best(b) == a / "best-step4.ckpt"  # evaluate.py --ckpt best (was: b/best-step4.ckpt)

    best = fit(tmp_path / "b", 10)  # step 10 validates best of all: saved in the new folder
    assert best.best_model_path == str(b / "best-step10.ckpt") and best.best_model_score == 4.0
    assert recorded_best(b) == b / "best-step10.ckpt"
    assert sorted(p.name for p in a.iterdir()) == before  # the other run's files stay
