"""Runs survive a kill: a resumed run ends exactly like an uninterrupted one, checkpoints are written
atomically, and an unreadable resume checkpoint is one clear error line."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from callbacks.lightning_compat import sharded_checkpoint_metadata
from datamodules.sampling import ResumableLoader, ShardedEpochSampler
from timerefine.pipeline.resume import RESUME_KEYS, CheckpointError, resume_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1")
MAX_STEPS, STEPS_PER_EPOCH = 24, 7
RUN = [
    "experiment=tiny",
    "data.source.num_train=50",  # 13 batches an epoch, the last one short
    "data.global_batch_size=8",  # two batches a step: 7 steps an epoch, the last of one batch
    f"trainer.max_steps={MAX_STEPS}",
    "model.saliency.projector_steps=0",
    "trainer.val_check_interval=10",  # batches: step 5 ends on batch 10, right before a validation
    "data.eval_batch_size=4",  # two validation batches: a validation can be stopped half-way
    "trainer.log_every_n_steps=1",
    "callbacks.checkpoint.last_every_n_steps=5",
    "model.lora.enabled=true",  # dropout: the random state must continue as well
    "model.refine.on_policy.fraction=0.5",  # callback state that changes the targets
    "model.refine.on_policy.every_n_steps=4",
    "model.refine.on_policy.num_samples=8",
]


def command(output_dir: Path) -> list[str]:
    return [sys.executable, "train.py", *RUN, f"output_dir={output_dir}"]


def identity(path: Path) -> tuple[int, int] | None:
    return (path.stat().st_ino, path.stat().st_mtime_ns) if path.exists() else None


def kill_after_next_checkpoint(output_dir: Path) -> int:
    """Start the run and ``kill -9`` it as soon as it has written a new ``last.ckpt``; its step."""
    last = output_dir / "checkpoints" / "last.ckpt"
    before = identity(last)
    with open(output_dir.parent / "killed.log", "a") as log:
        process = subprocess.Popen(command(output_dir), cwd=ROOT, env=ENV, stdout=log, stderr=log)
        while identity(last) == before:
            assert process.poll() is None, "the run ended before writing last.ckpt"
            time.sleep(0.002)
        process.send_signal(signal.SIGKILL)
        process.wait()
    return torch.load(last, map_location="cpu", weights_only=False)["global_step"]


def finish(output_dir: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command(output_dir), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300
    )
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
    output_dir = tmp_path_factory.mktemp("resume") / "uninterrupted"
    finish(output_dir)
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


@pytest.mark.slow
@pytest.mark.parametrize(
    ("hook", "step", "batch_idx", "sent", "resume_step"),
    [
        ("validation_step", 5, 0, signal.SIGTERM, None),  # Lightning stops after the first of two batches
        ("training_step", 7, 1, signal.SIGINT, 5),  # Ctrl-C inside the batch that ends step 8
    ],
)
def test_stopped_inside_a_step_or_its_validation_the_run_resumes_exactly(
    tmp_path, uninterrupted, hook, step, batch_idx, sent, resume_step
):
    """Before: ``last.ckpt`` was written where the signal came. Half-way through a validation,
    Lightning took that validation as done on resume (SIGTERM) or ran its rest only (Ctrl-C), so another
    checkpoint became the best; inside a step, the loader had counted the batch, so one was skipped.
    Now the last checkpoint written between steps stays the resume point (step 5's is written after
    its validation, so there is none yet)."""
    output_dir = tmp_path / "run"
    args = [hook, str(step), str(batch_idx), str(int(sent)), *RUN, f"output_dir={output_dir}"]
    stopped = subprocess.run(
        [sys.executable, "-c", SIGNALLED_RUN, *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert stopped.returncode != 0, stopped.stderr[-4000:]
    assert f"stopped inside a step or its validation at step {step}" in stopped.stderr
    last = output_dir / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=False)["global_step"] if last.exists() else None
    assert saved == resume_step
    assert ("resuming from" in finish(output_dir).stderr) == (resume_step is not None)
    rows = assert_ends_alike(output_dir, uninterrupted)

    def validations(rows: list[dict]) -> list[tuple[str, str, str]]:
        return [(r["step"], r["val/mIoU"], r["val/queries"]) for r in rows if r.get("val/mIoU")]

    assert validations(rows) == validations(final_state(uninterrupted)[2])  # each one whole, none skipped


class Keys(Dataset):
    """Returns the sampler's ``(epoch, index)`` key itself."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, int]:
        return key


def loader(size: int = 22, batch: int = 4, workers: int = 0) -> ResumableLoader:
    sampler = ShardedEpochSampler(size, True, seed=3)
    return ResumableLoader(Keys(size), sampler, batch_size=batch, num_workers=workers)


def keys(batches) -> list[tuple[int, int]]:
    return [(int(e), int(i)) for epochs, indices in batches for e, i in zip(epochs, indices, strict=True)]


def test_loader_state_resumes_mid_epoch_any_number_of_times():
    everything = keys(loader())
    first = loader()
    seen = keys(batch for _, batch in zip(range(2), first, strict=False))
    second = loader()
    second.load_state_dict(first.state_dict())
    seen += keys(batch for _, batch in zip(range(2), second, strict=False))
    third = loader()  # a second resume in the same epoch continues from the right place too
    third.load_state_dict(second.state_dict())
    assert third.state_dict() == {"epoch": 0, "batches": 4}
    assert seen + keys(third) == everything


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_state_at_the_end_of_an_epoch_starts_the_next_one_whole(workers):
    first = loader()
    first.sampler.set_epoch(2)
    list(first)
    resumed = loader(workers=workers)
    resumed.load_state_dict(first.state_dict())
    batches = iter(resumed)  # Lightning's order: load, iter, then set_epoch for the next epoch
    resumed.sampler.set_epoch(3)
    fresh = loader()
    fresh.sampler.set_epoch(3)
    assert keys(batches) == keys(fresh)
    assert resumed.state_dict() == {"epoch": 3, "batches": len(resumed)}


def test_loader_iteration_leaves_the_global_random_state_alone():
    before = torch.get_rng_state()
    list(loader())
    assert torch.equal(torch.get_rng_state(), before)  # dropout after a resume must not depend on epochs


CHILD = """
import sys
from pathlib import Path
import torch
from timerefine.pipeline.checkpoint_io import AtomicCheckpointIO
out = Path(sys.argv[1])
io = AtomicCheckpointIO()  # what build_trainer gives every Trainer (test_trainer_writes_checkpoints_atomically)
weights = torch.zeros(2**24)  # 64 MiB: a save lasts long enough to be killed in the middle of it
for step in range(10_000):
    io.save_checkpoint({"step": step, "weights": weights.fill_(step)}, out / "checkpoints" / "last.ckpt")
    print(step, flush=True)
"""


def listing(directory: Path) -> dict[str, tuple[int, int, int]]:
    entries = {}
    for entry in os.scandir(directory):
        with_stat = entry.stat()
        entries[entry.name] = (with_stat.st_ino, with_stat.st_size, with_stat.st_mtime_ns)
    return entries


@pytest.mark.slow
def test_kill_during_a_checkpoint_write_leaves_the_last_complete_checkpoint(tmp_path):
    # The system temp dir on another filesystem than the run, as on clusters (node-local /tmp).
    env = dict(ENV, TMPDIR="/dev/shm") if Path("/dev/shm").is_dir() else ENV
    process = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "0", "the first checkpoint was not written"
    directory = tmp_path / "checkpoints"
    complete = listing(directory)
    while listing(directory) == complete:  # the next save has started writing: kill it now
        assert process.poll() is None
    process.send_signal(signal.SIGKILL)
    process.wait()

    state = torch.load(directory / "last.ckpt", weights_only=True)
    assert torch.equal(state["weights"], torch.full((2**24,), float(state["step"])))
    assert all(name.startswith(".") for name in os.listdir(directory) if name != "last.ckpt")


def test_next_save_removes_what_a_killed_save_left(tmp_path):
    from timerefine.pipeline.checkpoint_io import AtomicCheckpointIO

    (tmp_path / ".partial-killed").write_bytes(b"half a checkpoint")
    AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "last.ckpt")
    assert os.listdir(tmp_path) == ["last.ckpt"]
    assert torch.load(tmp_path / "last.ckpt")["step"] == 1


def corrupt_variants(path: Path) -> dict[str, bytes]:
    torch.save(
        {key: {} for key in RESUME_KEYS} | {"state_dict": {"w": torch.ones(1000)}, "global_step": 3}, path
    )
    good = path.read_bytes()
    return {"truncated": good[: len(good) // 2], "empty": b"", "garbage": b"not a checkpoint\n" * 10}


@pytest.mark.parametrize("kind", ["truncated", "empty", "garbage"])
def test_unreadable_resume_checkpoint_is_a_one_line_error(tmp_path, kind):
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(corrupt_variants(tmp_path / "good.ckpt")[kind])
    for resume in ("auto", str(last)):
        with pytest.raises(CheckpointError) as error:
            resume_checkpoint(resume, tmp_path)
        message = str(error.value)
        assert str(last) in message and "\n" not in message and "resume=" in message  # what to do
        # deleting is advice only for the run's own resume point, not a file the user named
        assert ("delete it" in message) == (resume == "auto")


def test_readable_resume_checkpoint_is_used(tmp_path):
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    corrupt_variants(last)  # writes a good checkpoint there
    assert resume_checkpoint("auto", tmp_path) == str(last)


@pytest.mark.parametrize(
    "saved",
    [{"w": torch.ones(3)}, {"a": 1}, [1, 2]],
    ids=["weights-alone", "another-dict", "not-a-dict"],
)
def test_a_file_that_loads_but_is_no_training_checkpoint_is_a_one_line_error(tmp_path, saved):
    """Before: Lightning's KeyError traceback ('pytorch-lightning_version'), after the run had
    written its config, tokenizer and logs."""
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    torch.save(saved, last)
    for resume in ("auto", str(last)):
        with pytest.raises(CheckpointError, match=f"^checkpoint {last} cannot be read \\(not a Lightning"):
            resume_checkpoint(resume, tmp_path)


def test_a_sharded_last_checkpoint_is_resumed(tmp_path):
    """FSDP saves ``last.ckpt`` as a folder; ``resume=auto`` once took no file there as no checkpoint."""
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.mkdir(parents=True)
    metadata = sharded_checkpoint_metadata(last)
    torch.save({"pytorch-lightning_version": "2.6.0", "global_step": 3}, metadata)  # as FSDP writes it
    assert resume_checkpoint("auto", tmp_path) == str(last)
    metadata.unlink()
    with pytest.raises(CheckpointError, match="not a sharded checkpoint"):
        resume_checkpoint("auto", tmp_path)


@pytest.mark.parametrize(
    "damage, reason",
    [
        ("empty", "truncated or corrupt"),
        ("truncated", "truncated or corrupt"),
        ("foreign", "not a Lightning training checkpoint: no pytorch-lightning_version\\)"),
    ],
)
def test_a_sharded_checkpoint_with_damaged_metadata_is_refused_with_advice(tmp_path, damage, reason):
    """A folder whose metadata file is damaged was taken as whole; the run then failed later, without
    the advice to delete the run's own resume point."""
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.mkdir(parents=True)
    metadata = sharded_checkpoint_metadata(last)
    torch.save({"pytorch-lightning_version": "2.6.0", "loops": {"x": torch.zeros(1000)}}, metadata)
    whole = metadata.read_bytes()
    damaged = {"empty": b"", "truncated": whole[: len(whole) // 2], "foreign": None}[damage]
    if damaged is None:
        torch.save({"step": 3}, metadata)
    else:
        metadata.write_bytes(damaged)
    expected = (
        f"^checkpoint {last} cannot be read \\({metadata.name}: {reason}.*delete it to start the run over"
    )
    with pytest.raises(CheckpointError, match=expected):
        resume_checkpoint("auto", tmp_path)
    with pytest.raises(CheckpointError, match=f"{metadata.name}: {reason}.*; pass resume="):
        resume_checkpoint(str(last), tmp_path)


def test_train_with_a_truncated_last_checkpoint_exits_with_one_line(tmp_path):
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(corrupt_variants(tmp_path / "good.ckpt")["truncated"])
    (tmp_path / "good.ckpt").unlink()
    result = subprocess.run(
        [sys.executable, "train.py", "experiment=tiny", f"output_dir={tmp_path}"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: checkpoint {last} ")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "checkpoints",
        "checkpoints/last.ckpt",
    ]  # nothing written before the check


@pytest.mark.parametrize("left", ["checkpoints/last.ckpt", "checkpoints/best-step20.ckpt", "hpc_ckpt_1.ckpt"])
def test_resume_null_beside_an_earlier_runs_checkpoints_is_refused_before_writing(tmp_path, capsys, left):
    """Before: the new run wrote last-v1.ckpt beside the earlier run's last.ckpt, and a later
    resume=auto continued the earlier run."""
    import train

    (tmp_path / left).parent.mkdir(exist_ok=True)
    (tmp_path / left).write_bytes(b"an earlier run's checkpoint")
    assert train.main(["experiment=tiny", f"output_dir={tmp_path}", "resume=null"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        f"error: resume=null: {tmp_path} holds an earlier run's checkpoints ({left}), which a later "
        "resume=auto would continue instead of this run; give a new output_dir, or delete them to "
        "start the run over"
    ]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [left]


def test_resume_null_starts_over_where_no_checkpoint_was_saved(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / ".partial-123").write_bytes(b"a killed save")  # no checkpoint
    assert resume_checkpoint(None, tmp_path) is None


def test_trainer_writes_checkpoints_atomically(tmp_path):
    from timerefine.pipeline.build import build_datamodule, build_module, build_trainer
    from timerefine.pipeline.checkpoint_io import AtomicCheckpointIO
    from timerefine.pipeline.config import load_config

    cfg = load_config(["experiment=tiny", f"output_dir={tmp_path}"])
    module = build_module(cfg, build_datamodule(cfg))
    assert isinstance(build_trainer(cfg, tmp_path, module).strategy.checkpoint_io, AtomicCheckpointIO)


@pytest.mark.slow
def test_sigterm_keeps_the_progress_in_last_ckpt_alone_and_says_the_run_did_not_finish(tmp_path):
    """Before: exit 0 (Lightning's SIGTERMException is a SystemExit without a code), and besides
    last.ckpt an ``epoch=..-step=...ckpt`` copy at every interruption."""
    output_dir = tmp_path / "run"
    last = output_dir / "checkpoints" / "last.ckpt"
    run = [
        sys.executable,
        "train.py",
        "experiment=tiny",
        "trainer.max_steps=100000",
        "callbacks.checkpoint.last_every_n_steps=5",
        f"output_dir={output_dir}",
    ]
    process = subprocess.Popen(
        run, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    while not last.exists():
        assert process.poll() is None, "the run ended before writing last.ckpt"
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + 15
    assert err.strip().splitlines()[-1] == (
        f"stopped by SIGTERM: {last} holds its progress; the same command resumes it"
    )
    assert sorted(p.name for p in last.parent.iterdir() if not p.name.startswith("best")) == ["last.ckpt"]
    assert not (output_dir / "metrics.json").exists()
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] >= 5
