"""The best checkpoint that a resume point records exists: a run killed after a later validation replaced
it, continued to fewer steps, is tested on it; and the killed attempt's later best checkpoints, which the
continued run never records, are removed when it starts."""

from __future__ import annotations

import csv
import json
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from callbacks.best_checkpoint import BestCheckpoint
from tests import launched
from timerefine import train
from timerefine.pipeline.best_checkpoint import NoBestCheckpoint, checkpoint_path, recorded_best

ENV = dict(os.environ, OMP_NUM_THREADS="1")
# Validated every 4 steps, each validation's checkpoint the best (the step monitored: with val/mIoU the
# test hung on a tiny run's scores, which step 16 no longer beat once its prompts changed); last.ckpt at
# 12, 24, 36, recording the best of step 12's validation
RUN = [
    "experiment=tiny",
    "trainer.val_check_interval=4",
    "callbacks.checkpoint.monitor=step",
    "callbacks.checkpoint.last_every_n_steps=12",
    "trainer.log_every_n_steps=1",
    "model.optim.lr=1e-2",
    "model.optim.warmup_steps=4",
    "logger.tensorboard=false",
    "callbacks.refinement_trace=0",
]


def command(output_dir: Path, max_steps: int) -> list[str]:
    return ["train.py", *RUN, f"trainer.max_steps={max_steps}", f"output_dir={output_dir}"]


def csv_rows(output_dir: Path) -> list[dict[str, str]]:
    path = output_dir / "logs" / "csv" / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


@pytest.mark.slow
def test_a_run_continued_to_fewer_steps_is_tested_on_its_recorded_best(tmp_path):
    """Before: best-step16 replaced best-step12 (deleted at once) while last.ckpt@12 recorded best-step12;
    continued to 14 steps, the run failed at its end, "error: Checkpoint file not found: ...
    best-step12.ckpt", rc 2, at every rerun; and evaluate.py --ckpt best took the killed attempt's
    best-step16, past the run's end."""
    run, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"
    # killed at step 18, after the validation of step 16
    process = launched.Launched(command(run, 40), env=ENV, log=tmp_path / "killed.log")
    while not any(r.get("train/loss") and int(r["step"]) >= 17 for r in csv_rows(run)):
        assert process.poll() is None, "the run ended before it was killed"
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 12
    assert (checkpoints / "best-step16.ckpt").exists()

    result = launched.run(command(run, 14), env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"removed {checkpoints / 'best-step16.ckpt'}: not recorded by the checkpoint" in result.stderr
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best-step12.ckpt", "last.ckpt"]
    metrics = json.loads((run / "metrics.json").read_text())
    [step_12] = [float(r["val/mIoU"]) for r in csv_rows(run) if r["step"] == "11" and r.get("val/mIoU")]
    assert metrics["global_step"] == 14 and metrics["val/mIoU"] == pytest.approx(step_12, abs=1e-4)
    assert recorded_best(checkpoints) == checkpoints / "best-step12.ckpt"  # evaluate.py --ckpt best


class Strategy:
    def __init__(self) -> None:
        self.removed: list[str] = []

    def remove_checkpoint(self, filepath: str) -> None:
        self.removed.append(str(filepath))
        Path(filepath).unlink()


def started(
    tmp_path: Path, files: tuple[str, ...], recorded: tuple[str, ...], resumed: str | None
) -> list[str]:
    """The names left in a run's ``checkpoints/`` holding ``files`` after a fit starts from ``resumed``
    (a path under the run folder, or None) whose state records ``recorded`` as its best."""
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    for name in files:
        (folder / name).touch()
    best = BestCheckpoint(folder, "val/mIoU", "max", -1)
    best.best_k_models = {str(folder / name): torch.tensor(float(i)) for i, name in enumerate(recorded)}
    best.best_model_path = str(folder / recorded[-1]) if recorded else ""
    ckpt_path = None if resumed is None else tmp_path / "run" / resumed
    trainer = SimpleNamespace(global_step=12, is_global_zero=True, strategy=Strategy(), ckpt_path=ckpt_path)
    best.on_train_start(trainer, None)
    return sorted(p.name for p in folder.iterdir())


FILES = ("best-step4.ckpt", "best-step8.ckpt", "best-step16.ckpt", "last.ckpt")


@pytest.mark.parametrize(
    ("resumed", "recorded", "left"),
    [
        # the folder's resume point: an interrupted attempt's later best and an orphan replaced one go
        ("checkpoints/last.ckpt", ("best-step8.ckpt",), ["best-step8.ckpt", "last.ckpt"]),
        ("hpc_ckpt_2.ckpt", ("best-step8.ckpt",), ["best-step8.ckpt", "last.ckpt"]),  # a SLURM requeue's
        (None, (), ["last.ckpt"]),  # started over (killed before its first last.ckpt)
        # another checkpoint (an earlier one of this run, save_top_k=-1): the files that last.ckpt records stay
        ("checkpoints/best-step8.ckpt", ("best-step4.ckpt", "best-step8.ckpt"), list(sorted(FILES))),
    ],
)
def test_a_fit_start_keeps_only_what_its_resume_point_records(tmp_path, resumed, recorded, left):
    """Before: resumed from an earlier checkpoint of its own, a run removed the later best checkpoints
    that its newer last.ckpt still recorded; and a best replaced just before a SLURM requeue (or a kill
    between writing last.ckpt and removing it) stayed forever (found by review)."""
    assert started(tmp_path, FILES, recorded, resumed) == left


def test_a_best_of_another_folder_protects_no_file_here(tmp_path):
    """A run continued from another run's checkpoint records that run's best-step8: this folder's own
    best-step8, which nothing records, goes (before: file names were compared, so it stayed)."""
    folder = tmp_path / "run" / "checkpoints"
    other = tmp_path / "other" / "checkpoints"
    other.mkdir(parents=True)
    (other / "best-step8.ckpt").touch()
    left = started(tmp_path, ("best-step8.ckpt", "last.ckpt"), (), "checkpoints/last.ckpt")
    assert left == ["last.ckpt"] and (other / "best-step8.ckpt").exists()
    assert folder.is_dir()


def test_a_replaced_best_waits_for_the_last_checkpoint_that_records_its_replacement(tmp_path):
    best = BestCheckpoint(tmp_path, "val/mIoU", "max", 1)
    trainer = SimpleNamespace(global_step=12, is_global_zero=True, strategy=Strategy())
    (tmp_path / "best-step8.ckpt").touch()
    best._remove_checkpoint(trainer, str(tmp_path / "best-step8.ckpt"))  # replaced by a later best
    assert (tmp_path / "best-step8.ckpt").exists()  # until a last.ckpt records its replacement
    best.best_model_path = str(tmp_path / "best-step20.ckpt")
    best.best_k_models = {best.best_model_path: torch.tensor(6.0)}
    best.remove_replaced(trainer)
    assert not (tmp_path / "best-step8.ckpt").exists()
    assert best.state_key.startswith("ModelCheckpoint{")  # where earlier checkpoints saved its state


def test_a_run_that_ended_before_validating_is_tested_and_answered_on_its_last_weights(tmp_path, capsys):
    """Before: evaluate --ckpt best, predict, the demo, export and the API refused a finished run whose
    only validation came after its last step ('records no best checkpoint (no validation yet?)')."""
    run = tmp_path / "run"
    assert train.main(["experiment=tiny", "trainer.max_steps=3", f"output_dir={run}"]) == 0
    assert json.loads((run / "metrics.json").read_text())["checkpoint"] == "final weights"
    assert checkpoint_path(run, "best") == run / "checkpoints" / "last.ckpt"
    (run / "metrics.json").unlink()  # not finished: no weights were tested, so none is the best
    with pytest.raises(NoBestCheckpoint, match="it has not validated yet"):
        checkpoint_path(run, "best")
