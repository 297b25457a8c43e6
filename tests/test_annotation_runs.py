"""Short ``train.py`` runs on tiny Charades-STA annotation files written in tmp_path (no ../shared)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import train
from tools.pack_features import pack_folder

DIM, FRAMES = 16, 8
TRAIN_VIDEOS, TEST_VIDEOS = ("TRA01", "TRA02", "TRA03", "TRA04"), ("TES01", "TES02")
SENTENCES = ("a person opens a door.", "someone sits on a chair.", "person holds a cup.")


def charades_root(root: Path) -> Path:
    """Duration CSVs and train/test annotation files: 3 queries per video, durations 20 s."""
    root.mkdir(parents=True)
    rows = "".join(f"{video},x,20.0\n" for video in TRAIN_VIDEOS + TEST_VIDEOS)
    (root / "Charades_v1_train.csv").write_text("id,subject,length\n" + rows)
    for split, videos in (("train", TRAIN_VIDEOS), ("test", TEST_VIDEOS)):
        lines = [f"{v} {2.0 * i} {2.0 * i + 6.0}##{s}" for v in videos for i, s in enumerate(SENTENCES)]
        (root / f"charades_sta_{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def feature_folder(root: Path, videos: tuple[str, ...]) -> Path:
    root.mkdir(parents=True)
    for i, video in enumerate(videos):
        np.save(root / f"{video}.npy", np.random.default_rng(i).standard_normal((12, DIM)).astype(np.float32))
    return root


def tiny_run(root: Path, output_dir: Path, *overrides: str) -> list[str]:
    """Overrides for a few-step run with a 1-layer LM on the annotations in ``root``."""
    return [
        "data=charades_sta",
        f"data.source.root={root}",
        f"data.source.feature_dim={DIM}",
        f"data.source.num_frames={FRAMES}",
        "data.batch_size=4",
        "data.eval_batch_size=8",
        "model.lm.tiny.hidden_size=32",
        "model.lm.tiny.num_layers=1",
        "model.lm.tiny.num_heads=2",
        "model.lm.tiny.intermediate_size=64",
        "model.lm.tokenizer_vocab_size=300",
        "trainer.accelerator=cpu",
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "callbacks.progress_bar=none",
        "logger.tensorboard=false",
        f"output_dir={output_dir}",
        *overrides,
    ]


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_and_test_on_packed_features(tmp_path, num_workers):
    root = charades_root(tmp_path / "charades")
    folder = feature_folder(tmp_path / "features", TRAIN_VIDEOS + TEST_VIDEOS)
    pack_folder(folder, tmp_path / "packed", num_frames=FRAMES, feature_dim=DIM)
    overrides = tiny_run(
        root,
        tmp_path / "run",
        "data.source.features=packed",
        f"data.source.feature_path={tmp_path / 'packed'}",
        f"data.num_workers={num_workers}",
    )
    assert train.main(overrides) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["global_step"] == 4
    assert metrics["test/coverage"] == metrics["val/coverage"] == 100.0
    predictions = (tmp_path / "run" / "predictions" / "test.jsonl").read_text().splitlines()
    assert len(predictions) == len(TEST_VIDEOS) * len(SENTENCES)
