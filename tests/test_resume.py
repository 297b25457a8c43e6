"""Runs survive a kill: checkpoints are written atomically, and an unreadable resume checkpoint is one
clear error line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.resume import CheckpointError, resume_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1")
CHILD = """
import sys
from pathlib import Path
import torch
from pipeline.build import build_trainer
from pipeline.config import load_config
out = Path(sys.argv[1])
io = build_trainer(load_config(["experiment=tiny", f"output_dir={out}"]), out, None).strategy.checkpoint_io
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
    from pipeline.checkpoint_io import AtomicCheckpointIO

    (tmp_path / ".partial-killed").write_bytes(b"half a checkpoint")
    AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "last.ckpt")
    assert os.listdir(tmp_path) == ["last.ckpt"]
    assert torch.load(tmp_path / "last.ckpt")["step"] == 1


def corrupt_variants(path: Path) -> dict[str, bytes]:
    torch.save({"state_dict": {"w": torch.ones(1000)}, "global_step": 3}, path)
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
        assert str(last) in message and "\n" not in message
        assert "delete" in message and "resume=" in message  # what to do about it


def test_readable_resume_checkpoint_is_used(tmp_path):
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    corrupt_variants(last)  # writes a good checkpoint there
    assert resume_checkpoint("auto", tmp_path) == str(last)


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
