"""Resume points: the training loader's place in an epoch, atomic checkpoint files, and one clear
error line for a resume checkpoint that cannot be used (runs killed and resumed: test_resume_runs.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from callbacks.lightning_compat import sharded_checkpoint_metadata
from datamodules.sampling import ResumableLoader, ShardedEpochSampler
from tests import launched
from timerefine.pipeline.resume import RESUME_KEYS, CheckpointError, resume_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


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
    result = launched.run(["train.py", "experiment=tiny", f"output_dir={tmp_path}"], env=ENV, timeout=120)
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


def saved_at(path: Path, step: int) -> Path:
    """A training checkpoint file at ``path`` that holds ``step`` and no weights."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({key: {} for key in RESUME_KEYS} | {"global_step": step}, path)
    return path


@pytest.mark.parametrize(("hpc_step", "last_step", "chosen"), [(5, 9, "last"), (9, 9, "hpc"), (9, 5, "hpc")])
def test_auto_resumes_from_the_newest_resume_point(tmp_path, monkeypatch, hpc_step, last_step, chosen):
    """Before: any HPC checkpoint, however old (a job that went on after its requeue, stopped by a
    SIGTERM, saves its progress in last.ckpt). Now the newest by step; HPC at a tie (Lightning's hpc)."""
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "tr")
    saved_at(tmp_path / "hpc_ckpt_1.ckpt", 2)
    saved_at(tmp_path / "hpc_ckpt_2.ckpt", hpc_step)
    last = saved_at(tmp_path / "checkpoints" / "last.ckpt", last_step)
    assert resume_checkpoint("auto", tmp_path) == {"last": str(last), "hpc": "hpc"}[chosen]
