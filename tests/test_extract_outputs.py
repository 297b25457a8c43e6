"""What timerefine-extract-features refuses to write: features of a model that is no CLIP vision
tower, features beside unrecorded ones, and output folders it cannot make (found by a review of the
data preparation tools)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from tests.inference_runs import write_moment_video, write_tiny_clip
from timerefine.inference.frame_encoder import ENCODER_RECORD, ClipFrameEncoder, EncoderLoadError
from timerefine.tools.extract_features import main, videos_in


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_tiny_clip(root / "clip")
    write_tiny_clip(root / "no_projection", projection=False)
    config = json.loads((write_tiny_clip(root / "other_shapes") / "config.json").read_text())
    (root / "other_shapes" / "config.json").write_text(json.dumps(config | {"projection_dim": 8}))
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100)).save_pretrained(root / "gpt2")
    return root


@pytest.fixture
def videos(tmp_path: Path) -> Path:
    folder = tmp_path / "videos"
    folder.mkdir()
    write_moment_video(folder / "a.mp4", 1.0, "red", 0.2, 0.6)
    return folder


def extract_error(capsys, videos: Path, out: Path, model: Path, *flags: str) -> str:
    """The one error line of a run that must stop with exit 2."""
    argv = [str(videos), str(out), "--model", str(model), "--num-frames", "4", "--workers", "0", *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("gpt2", "not a CLIP vision model (model_type gpt2): 200 of its weights are missing"),
        ("no_projection", "a vision tower without a projection: its pooled output is what it gives"),
        (
            "other_shapes",
            "1 of its weights have other shapes than its config.json gives, e.g. visual_projection",
        ),
    ],
)
def test_a_model_with_weights_missing_is_refused(models, videos, tmp_path, capsys, model, message):
    """Before: transformers started the missing weights at random and the tool wrote features of a
    random encoder, with an encoder.json vouching for them, and exit 0 (other shapes: a traceback)."""
    error = extract_error(capsys, videos, tmp_path / "out", models / model)
    assert error.startswith(f"error: --model {models / model}: {message}")
    assert not (tmp_path / "out").exists()


def test_the_pooled_output_of_a_tower_without_projection_is_read(models):
    assert ClipFrameEncoder(str(models / "no_projection"), projection=False).dim == 32
    with pytest.raises(EncoderLoadError, match="without a projection"):
        ClipFrameEncoder(str(models / "no_projection"))


def test_a_tower_read_without_its_projection_loads_quietly(models, caplog):
    """Before (review): transformers' multi-line load report (the projection UNEXPECTED) on stderr, before
    any answer or error line; a whole CLIPModel checkpoint leaves its text tower unread too."""
    with caplog.at_level(logging.WARNING):
        assert ClipFrameEncoder(str(models / "clip"), projection=False).dim == 32
    assert "LOAD REPORT" not in caplog.text


def test_features_without_an_encoder_record_are_not_adopted(models, videos, tmp_path, capsys):
    """Before: the old file was kept as done ("skipped 1 done") and a new encoder.json vouched for it."""
    out = tmp_path / "out"
    out.mkdir()
    np.save(out / "a.npy", np.ones((4, 16), np.float16))
    error = extract_error(capsys, videos, out, models / "clip")
    assert error.startswith(f"error: {out}: holds .npy feature files (1: a.npy, ...) but no {ENCODER_RECORD}")
    assert not (out / ENCODER_RECORD).exists()


def test_an_encoder_record_that_is_no_object_is_one_line(models, videos, tmp_path, capsys):
    """Before: AttributeError: 'list' object has no attribute 'get', exit 1."""
    out = tmp_path / "out"
    out.mkdir()
    (out / ENCODER_RECORD).write_text("[]")
    error = extract_error(capsys, videos, out, models / "clip")
    assert error.startswith(
        f"error: {out / ENCODER_RECORD}: not an encoder record (a JSON list, not an object)"
    )


def test_an_output_folder_that_cannot_be_made_is_one_line(models, videos, capsys):
    """Before: a FileNotFoundError traceback from mkdir, exit 1 (as root; others: no write access)."""
    out = Path("/proc/timerefine_features")  # no folder can be made in /proc, even by root
    assert extract_error(capsys, videos, out, models / "clip").startswith(f"error: OUT_DIR {out}: ")


def test_folders_beside_the_videos_are_named(tmp_path, caplog):
    """Before: videos in subfolders were left out in silence."""
    for folder in ("train", "val.mp4", ".cache", "features"):
        (tmp_path / folder).mkdir()
    (tmp_path / "a.mp4").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        videos_in(tmp_path, tmp_path / "features")
    assert f"left out 2 folders (the videos directly in {tmp_path} are read): train, val.mp4" in caplog.text
