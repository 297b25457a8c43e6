"""A checkpoint that cannot be read, or whose weights do not fit the run, is one line naming it (exit 2)
in every tool that loads one; ``--ckpt best`` looks past an unreadable ``last.ckpt``."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
from timerefine.pipeline.best_checkpoint import checkpoint_path
from timerefine.tools import export, predict


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture
def run(builtin_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(builtin_run, copy, ignore=shutil.ignore_patterns("eval"))
    return copy


def best(run: Path) -> Path:
    (path,) = run.glob("checkpoints/best-*.ckpt")
    return path


def truncated(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[:5000])
    return path


def with_projector_weight(run: Path, tmp_path: Path, name: str, change) -> Path:
    """A copy of the run's checkpoint, ``name``, whose projector weight is ``change(weight)``."""
    checkpoint = torch.load(best(run), weights_only=False)
    key = next(k for k in checkpoint["state_dict"] if "projector" in k and k.endswith("weight"))
    checkpoint["state_dict"][key] = change(checkpoint["state_dict"][key])
    torch.save(checkpoint, tmp_path / name)
    return tmp_path / name


def foreign(run: Path, tmp_path: Path) -> Path:
    """The run's checkpoint with the projector of another width: a model of other settings."""
    return with_projector_weight(run, tmp_path, "foreign.ckpt", lambda weight: torch.zeros(3, 3))


def diverged(run: Path, tmp_path: Path) -> Path:
    """The run's checkpoint with a NaN in one weight."""
    return with_projector_weight(
        run, tmp_path, "diverged.ckpt", lambda weight: weight.index_fill(0, torch.tensor([0]), float("nan"))
    )


def recorded_unknown_key(run: Path, tmp_path: Path) -> Path:
    """The run's checkpoint recording a config key today's schema lacks (another version's run)."""
    checkpoint = torch.load(best(run), weights_only=False)
    checkpoint["hyper_parameters"]["config"]["data"]["old_key"] = 1
    torch.save(checkpoint, tmp_path / "old_schema.ckpt")
    return tmp_path / "old_schema.ckpt"


def carrying_no_tokenizer(run: Path, tmp_path: Path) -> Path:
    """The run's checkpoint whose carried tokenizer.json is JSON but no tokenizer."""
    checkpoint = torch.load(best(run), weights_only=False)
    checkpoint["tokenizer_files"]["tokenizer.json"] = b"{}"
    torch.save(checkpoint, tmp_path / "no_tokenizer.ckpt")
    return tmp_path / "no_tokenizer.ckpt"


def tools(run: Path, tmp_path: Path, ckpt: str) -> dict:
    features = tmp_path / "video.npy"
    np.save(features, np.zeros((8, 4), dtype=np.float32))
    return {
        "evaluate": lambda: evaluate.main([str(run), "--ckpt", ckpt, "--name", "x"]),
        "predict": lambda: predict.main(
            [str(features), "--run", str(run), "--ckpt", ckpt, "--query", "x", "--duration", "5"]
        ),
        "export": lambda: export.main([str(run), str(tmp_path / "export"), "--ckpt", ckpt]),
    }


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["evaluate", "predict", "export"])
@pytest.mark.parametrize(
    "kind",
    [
        "truncated",
        "foreign",
        "folder",
        "not_a_checkpoint",
        "diverged",
        "recorded_unknown_key",
        "no_tokenizer",
    ],
)
def test_a_bad_checkpoint_is_one_line_in_every_tool(run, tmp_path, capsys, tool, kind):
    """Before: an mmap/unpickling/IsADirectory/size-mismatch traceback, exit 1; a NaN weight: every
    answer [0, 0] and NaN in the JSON, exit 0."""
    path = {
        "truncated": lambda: truncated(best(run)),
        "foreign": lambda: foreign(run, tmp_path),
        "folder": lambda: run / "checkpoints",
        "not_a_checkpoint": lambda: run / "config.yaml",
        "diverged": lambda: diverged(run, tmp_path),
        "recorded_unknown_key": lambda: recorded_unknown_key(run, tmp_path),
        "no_tokenizer": lambda: carrying_no_tokenizer(run, tmp_path),  # a KeyError traceback (review)
    }[kind]()
    assert tools(run, tmp_path, str(path))[tool]() == 2
    assert str(path) in one_error_line(capsys)


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["evaluate", "predict", "export"])
@pytest.mark.parametrize("content", ["{", "{}", "[]"])  # truncated; JSON but no tokenizer (review)
def test_a_damaged_tokenizer_is_one_line_in_every_tool(run, tmp_path, capsys, tool, content):
    """Before: a JSONDecodeError traceback, exit 1; a KeyError or TypeError one for JSON that is no
    tokenizer."""
    saved = run / "tokenizer" / "tokenizer.json"
    saved.write_text(content)
    assert tools(run, tmp_path, "best")[tool]() == 2
    assert one_error_line(capsys).startswith(f"error: {saved.parent}: the run's tokenizer cannot be read")


@pytest.mark.slow
def test_best_looks_past_an_unreadable_last_checkpoint(run, caplog):
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert checkpoint_path(run, "best") == best(run)
    assert "skipped: checkpoint" in caplog.text and "last.ckpt cannot be read" in caplog.text


@pytest.mark.slow
def test_an_unreadable_best_checkpoint_is_named(run, tmp_path, capsys):
    truncated(best(run))
    (run / "checkpoints" / "last.ckpt").unlink()
    assert evaluate.main([str(run)]) == 2
    assert one_error_line(capsys).endswith("checkpoints (1 cannot be read)")


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["evaluate", "predict", "export"])
def test_a_config_edited_against_its_checkpoint_is_one_line_in_every_tool(run, tmp_path, capsys, tool):
    """Before: evaluate and predict decoded the answers on the edited timeline, exit 0."""
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("timeline: uniform99", "timeline: vtimellm100"))
    assert tools(run, tmp_path, "best")[tool]() == 2
    line = one_error_line(capsys)
    assert (
        str(best(run)) in line and "data.timeline" in line and "trained with data.timeline=uniform99" in line
    )
