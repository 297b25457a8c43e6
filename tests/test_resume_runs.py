"""Runs survive a kill or a signal: resumed, they end exactly like an uninterrupted run, and a SIGTERM
says where the run stands."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests import launched

CONTINUES = "the same command with output_dir={} continues it"  # the default output_dir is a new folder
ENV = dict(os.environ, OMP_NUM_THREADS="1")
MAX_STEPS, STEPS_PER_EPOCH = 24, 7
RUN = [
    "experiment=tiny",
    "data.source.num_train=50",  # 13 batches an epoch, the last one short
    "data.global_batch_size=8",  # two batches a step: 7 steps an epoch, the last of one batch
    f"trainer.max_steps={MAX_STEPS}",
    "model.saliency.projector_steps=0",
    "trainer.val_check_interval=5",  # steps: step 5 ends on batch 10, right before a validation
    "data.eval_batch_size=4",  # two validation batches: a validation can be stopped half-way
    "trainer.log_every_n_steps=1",
    "callbacks.checkpoint.last_every_n_steps=5",
    "model.lora.enabled=true",  # dropout: the random state must continue as well
    "model.refine.on_policy.fraction=0.5",  # callback state that changes the targets
    "model.refine.on_policy.every_n_steps=4",
    "model.refine.on_policy.num_samples=8",
]


def command(output_dir: Path) -> list[str]:
    return ["train.py", *RUN, f"output_dir={output_dir}"]


def identity(path: Path) -> tuple[int, int] | None:
    return (path.stat().st_ino, path.stat().st_mtime_ns) if path.exists() else None


def kill_after_next_checkpoint(output_dir: Path) -> int:
    """Start the run and ``kill -9`` it as soon as it has written a new ``last.ckpt``; its step."""
    last = output_dir / "checkpoints" / "last.ckpt"
    before = identity(last)
    process = launched.Launched(command(output_dir), env=ENV, log=output_dir.parent / "killed.log")
    while identity(last) == before:
        assert process.poll() is None, "the run ended before writing last.ckpt"
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    return torch.load(last, map_location="cpu", weights_only=False)["global_step"]


def finish(output_dir: Path) -> subprocess.CompletedProcess:
    result = launched.run(command(output_dir), env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def final_state(output_dir: Path) -> tuple[dict, dict, list[dict]]:
    weights = torch.load(output_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    metrics = json.loads((output_dir / "metrics.json").read_text())
    with open(output_dir / "logs" / "csv" / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    return weights["state_dict"], metrics, rows


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """In a fresh interpreter: the runs compared with it are forked, with another hash seed."""
    output_dir = tmp_path_factory.mktemp("resume") / "uninterrupted"
    result = launched.fresh(command(output_dir), env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return output_dir


def assert_ends_alike(output_dir: Path, uninterrupted: Path) -> list[dict]:
    """The weights and metrics of ``output_dir``'s run are the uninterrupted run's; its CSV rows."""
    weights, metrics, rows = final_state(output_dir)
    expected_weights, expected_metrics, _ = final_state(uninterrupted)
    assert weights.keys() == expected_weights.keys()
    for name, tensor in expected_weights.items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=1e-6, msg=name)
    assert metrics == expected_metrics
    return rows


@pytest.mark.slow
def test_run_killed_twice_mid_epoch_ends_like_an_uninterrupted_run(tmp_path, uninterrupted):
    killed = tmp_path / "killed"
    steps = [kill_after_next_checkpoint(killed), kill_after_next_checkpoint(killed)]
    # Both kills come right after a mid-epoch last.ckpt; the first one's step ends on the batch that
    # validation follows.
    assert steps == [5, 10] and all(step % STEPS_PER_EPOCH for step in steps)
    assert "resuming from" in finish(killed).stderr

    rows, expected_rows = assert_ends_alike(killed, uninterrupted), final_state(uninterrupted)[2]
    # The CSV log holds no repeated rows. Lightning logs a batch's training row after the batch-end
    # hooks, so the row of the batch last.ckpt was written at is missing when the kill fell in between.
    after_checkpoint = next(r for r in expected_rows if r["train/loss"] and int(r["step"]) == steps[-1] - 1)
    assert rows in (expected_rows, [r for r in expected_rows if r is not after_checkpoint])


# Sends ``signal`` to the run itself inside ``GroundingModule.<hook>`` at ``global_step``, batch ``batch_idx``.
SIGNALLED_RUN = """
import os, signal, sys
from lightning_modules.grounding_module import GroundingModule
from timerefine import train
hook_name, step, index, number = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
hook = getattr(GroundingModule, hook_name)
def signalled(self, batch, batch_idx):
    if self.trainer.global_step == step and batch_idx == index and not self.trainer.sanity_checking:
        os.kill(os.getpid(), number)
    return hook(self, batch, batch_idx)
setattr(GroundingModule, hook_name, signalled)
sys.exit(train.main(sys.argv[5:]))
"""


def signalled_run(
    hook: str, step: int, batch_idx: int, sent: int, overrides: list[str]
) -> subprocess.CompletedProcess:
    """``train.py overrides`` sent signal ``sent`` in ``GroundingModule.<hook>`` at ``step``, ``batch_idx``."""
    args = [hook, str(step), str(batch_idx), str(int(sent)), *overrides]
    return launched.run(["-c", SIGNALLED_RUN, *args], env=ENV, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("hook", "step", "batch_idx", "sent", "resume_step"),
    [
        ("validation_step", 5, 0, signal.SIGTERM, None),  # Lightning stops after the first of two batches
        ("training_step", 7, 1, signal.SIGINT, 5),  # Ctrl-C inside the batch that ends step 8
        ("training_step", 7, 0, signal.SIGTERM, 5),  # after the first of step 8's two batches
    ],
)
def test_stopped_inside_a_step_or_its_validation_the_run_resumes_exactly(
    tmp_path, uninterrupted, hook, step, batch_idx, sent, resume_step
):
    """Before: ``last.ckpt`` was written where the signal came. Half-way through a validation,
    Lightning took that validation as done on resume (SIGTERM) or ran its rest only (Ctrl-C), so another
    checkpoint became the best; inside a batch, the loader had counted it, so one was skipped; between
    the two batches of a step, the first one's gradients were lost; Ctrl-C ended with Lightning's
    exit code 1 and no word of the resume point.
    Now the last checkpoint written between steps stays the resume point (step 5's is written after
    its validation, so there is none yet)."""
    output_dir = tmp_path / "run"
    stopped = signalled_run(hook, step, batch_idx, sent, [*RUN, f"output_dir={output_dir}"])
    assert stopped.returncode == 128 + sent, stopped.stderr[-4000:]  # as a shell reports the signal
    assert f"stopped inside a step or its validation at step {step}" in stopped.stderr
    last = output_dir / "checkpoints" / "last.ckpt"
    how = "interrupted (Ctrl-C)" if sent == signal.SIGINT else "stopped by SIGTERM"
    where = f"{last} is the resume point" if resume_step else "no checkpoint yet; the run starts over"
    assert stopped.stderr.strip().splitlines()[-1] == f"{how}: {where}; {CONTINUES.format(output_dir)}"
    saved = torch.load(last, map_location="cpu", weights_only=False)["global_step"] if last.exists() else None
    assert saved == resume_step
    assert ("resuming from" in finish(output_dir).stderr) == (resume_step is not None)
    rows = assert_ends_alike(output_dir, uninterrupted)

    def validations(rows: list[dict]) -> list[tuple[str, str, str]]:
        return [(r["step"], r["val/mIoU"], r["val/queries"]) for r in rows if r.get("val/mIoU")]

    assert validations(rows) == validations(final_state(uninterrupted)[2])  # each one whole, none skipped


@pytest.mark.slow
def test_sigterm_keeps_the_progress_in_last_ckpt_alone_and_says_the_run_did_not_finish(tmp_path):
    """Before: exit 0 (Lightning's SIGTERMException is a SystemExit without a code), and besides
    last.ckpt an ``epoch=..-step=...ckpt`` copy at every interruption."""
    output_dir = tmp_path / "run"
    last = output_dir / "checkpoints" / "last.ckpt"
    run = [
        "train.py",
        "experiment=tiny",
        "trainer.max_steps=100000",
        "callbacks.checkpoint.last_every_n_steps=5",
        f"output_dir={output_dir}",
    ]
    process = launched.Launched(run, env=ENV)
    while not last.exists():
        assert process.poll() is None, "the run ended before writing last.ckpt"
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + 15
    assert err.strip().splitlines()[-1] == (
        f"stopped by SIGTERM: {last} is the resume point; {CONTINUES.format(output_dir)}"
    )
    assert sorted(p.name for p in last.parent.iterdir() if not p.name.startswith("best")) == ["last.ckpt"]
    assert not (output_dir / "metrics.json").exists()
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] >= 5


# Sends SIGTERM to the run itself at the end of epoch ``argv[1]``, after its last step's checks.
EPOCH_END_SIGTERM = """
import os, signal, sys
from lightning_modules.grounding_module import GroundingModule
from timerefine import train
def signalled(self):
    if self.current_epoch == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGTERM)
GroundingModule.on_train_epoch_end = signalled
sys.exit(train.main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_a_sigterm_at_an_epochs_end_resumes_into_the_next_epoch(tmp_path, uninterrupted):
    """Before: Lightning stopped after the epoch ended, and last.ckpt saved there resumed into an
    empty epoch: the next one took the data order of the one after (found by a docs audit)."""
    output_dir = tmp_path / "run"
    stopped = launched.run(
        ["-c", EPOCH_END_SIGTERM, "0", *RUN, f"output_dir={output_dir}"], env=ENV, timeout=300
    )
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-4000:]
    last = torch.load(output_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == STEPS_PER_EPOCH
    assert "resuming epoch 0 after its first 13 batches" in finish(output_dir).stderr
    assert assert_ends_alike(output_dir, uninterrupted) == final_state(uninterrupted)[2]


@pytest.mark.slow
def test_a_sigterm_at_the_last_epochs_end_resumes_as_finished(tmp_path):
    """The stop after the last epoch of a ``max_epochs`` run keeps the state Lightning ends a fit
    with (review: rewritten as a step's end, the rerun saved its steps one short, and a run continued
    with more epochs logged each step one too early). So does the uninterrupted run: before, its
    last.ckpt stayed at its last multiple of ``last_every_n_steps`` (30 of 32), and continued, it
    trained steps 30-32 again."""
    tiny = [
        "experiment=tiny",  # 16 steps an epoch
        "trainer.max_steps=-1",
        "callbacks.checkpoint.last_every_n_steps=10",
        "logger.tensorboard=false",
        "callbacks.refinement_trace=0",
    ]
    epochs, more = [*tiny, "trainer.max_epochs=2"], [*tiny, "trainer.max_epochs=3"]

    def run(*argv: str, fresh: bool = False) -> int:
        return (launched.fresh if fresh else launched.run)(list(argv), env=ENV, timeout=300).returncode

    def saved_step(output_dir: Path) -> int:
        last = output_dir / "checkpoints" / "last.ckpt"
        return torch.load(last, map_location="cpu", weights_only=False)["global_step"]

    stopped, uninterrupted = tmp_path / "stopped", tmp_path / "uninterrupted"
    assert run("-c", EPOCH_END_SIGTERM, "1", *epochs, f"output_dir={stopped}") == 128 + signal.SIGTERM
    for output_dir in (stopped, uninterrupted):
        fresh = output_dir == uninterrupted  # in a fresh interpreter: another hash seed
        assert run("train.py", *epochs, f"output_dir={output_dir}", fresh=fresh) == 0
        assert saved_step(output_dir) == 32
        assert run("train.py", *more, f"output_dir={output_dir}", fresh=fresh) == 0
        assert saved_step(output_dir) == 48
    assert assert_ends_alike(stopped, uninterrupted) == final_state(uninterrupted)[2]


@pytest.mark.slow
def test_a_run_bounded_by_epochs_resumes_its_epochs_data_order(tmp_path):
    """Before: asked for the step count before the checkpoint was restored (the learning-rate curve),
    Lightning built the training loader early and never gave it the saved position (its issue #20550):
    a run of ``max_epochs`` resumed mid-epoch trained the epoch's first batches again, and ended with
    other weights and scores (found by a review)."""
    epochs = [*RUN, "trainer.max_steps=-1", "trainer.max_epochs=2"]  # 14 steps
    stopped, uninterrupted = tmp_path / "stopped", tmp_path / "uninterrupted"
    signalled_run("training_step", 7, 0, signal.SIGTERM, [*epochs, f"output_dir={stopped}"])
    saved = torch.load(stopped / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 5
    finished = {}
    for output_dir in (stopped, uninterrupted):
        start = launched.fresh if output_dir == uninterrupted else launched.run  # another hash seed
        finished[output_dir] = start(["train.py", *epochs, f"output_dir={output_dir}"], env=ENV, timeout=300)
        assert finished[output_dir].returncode == 0, finished[output_dir].stderr[-4000:]
    assert "resuming epoch 0 after its first 10 batches" in finished[stopped].stderr
    assert assert_ends_alike(stopped, uninterrupted) == final_state(uninterrupted)[2]
