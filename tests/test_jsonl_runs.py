"""data=jsonl end to end: tiny JSONL files written in tmp_path (some queries with 2-3 windows), a short
``train.py`` run on synthetic features, and its test predictions scored by the chosen multi-window rule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import evaluate
import train
from grounding.metrics.protocols import EXACT
from grounding.metrics.windows import multi_window_iou
from timerefine.tools.rescore import rescore

SENTENCES = ("a person opens a door.", "someone sits on a chair.", "person holds a cup.")
WINDOWS = ([[2.0, 8.0]], [[1.0, 5.0], [12.0, 18.0]], [[0.0, 4.0], [8.0, 11.0], [15.0, 19.0]])


def write_split(root: Path, split: str, videos: int) -> int:
    """``videos`` 20-s videos with the three queries each: one, two and three windows."""
    entries = [
        {"qid": f"{split}-{v}-{i}", "query": s, "video_id": f"{split}{v}", "duration": 20.0, "windows": w}
        for v in range(videos)
        for i, (s, w) in enumerate(zip(SENTENCES, WINDOWS, strict=True))
    ]
    (root / f"{split}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    return len(entries)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["best", "union"])
def test_jsonl_trains_and_tests_with_several_windows(tmp_path, mode):
    root = tmp_path / "jsonl"
    root.mkdir()
    write_split(root, "train", 4)
    write_split(root, "val", 2)
    num_test = write_split(root, "test", 2)
    output_dir = tmp_path / "run"
    overrides = [
        "data=jsonl",
        f"data.source.root={root}",
        "data.source.features=synthetic",
        f"data.source.multi_window={mode}",
        "data.source.feature_dim=16",
        "data.source.num_frames=8",
        "data.batch_size=4",
        "data.eval_batch_size=8",
        "model.lm.tiny.hidden_size=32",
        "model.lm.tiny.num_layers=1",
        "model.lm.tiny.num_heads=2",
        "model.lm.tiny.intermediate_size=64",
        "model.lm.tokenizer_vocab_size=300",
        "trainer.accelerator=cpu",
        "trainer.max_steps=4",
        "model.saliency.projector_steps=0",
        "trainer.val_check_interval=3",
        "trainer.enable_progress_bar=false",
        "callbacks.progress_bar=none",
        "logger.tensorboard=false",
        f"output_dir={output_dir}",
    ]
    assert train.main(overrides) == 0
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["test/coverage"] == metrics["val/coverage"] == 100.0
    assert metrics["test/queries"] == num_test

    rows = read_rows(output_dir / "predictions" / "test.jsonl")
    assert len(rows) == num_test
    by_windows = {len(row.get("windows", [row["gt"]])): row for row in rows}
    assert sorted(by_windows) == [1, 2, 3] and "windows" not in by_windows[1]
    assert by_windows[3]["windows"] == WINDOWS[2]
    assert_scored_by(rows, metrics, mode, output_dir / "predictions" / "test.jsonl")

    # The same checkpoint's same answers, scored by the other rule: the switch changes the scores.
    other = {"best": "union", "union": "best"}[mode]
    assert evaluate.main([str(output_dir), "--name", other, f"data.source.multi_window={other}"]) == 0
    other_rows = read_rows(output_dir / "eval" / other / "predictions" / "test.jsonl")
    assert [row["pred"] for row in other_rows] == [row["pred"] for row in rows]
    other_metrics = json.loads((output_dir / "eval" / other / "metrics.json").read_text())
    assert_scored_by(
        other_rows, other_metrics, other, output_dir / "eval" / other / "predictions" / "test.jsonl"
    )
    assert [row["iou"] for row in other_rows] != [row["iou"] for row in rows]


def write_features(folder: Path, videos: list[str]) -> Path:
    folder.mkdir(exist_ok=True)
    for video in videos:
        np.save(
            folder / f"{video}.npy", np.random.default_rng(len(video)).normal(size=(8, 16)).astype("float32")
        )
    return folder


@pytest.mark.slow
def test_an_evaluation_on_new_test_data_needs_no_validation_split_nor_training_features(tmp_path):
    """Before: evaluate read and checked every split, so a new test set needed the validation file and
    the features of every training video; only the training annotations are read (the prior is fitted on
    them), not their features (found by a review)."""
    root, new = tmp_path / "jsonl", tmp_path / "new"
    root.mkdir(), new.mkdir()
    for split, videos in (("train", 2), ("val", 1), ("test", 1)):
        write_split(root, split, videos)
    features = write_features(tmp_path / "features", ["train0", "train1", "val0", "test0"])
    output_dir = tmp_path / "run"
    overrides = [
        "data=jsonl",
        f"data.source.root={root}",
        "data.source.features=folder",
        f"data.source.feature_path={features}",
        "data.source.feature_dim=16",
        "data.source.num_frames=8",
        "model.lm.tiny.hidden_size=32",
        "model.lm.tiny.num_layers=1",
        "model.lm.tiny.num_heads=2",
        "model.lm.tokenizer_vocab_size=300",
        "trainer.max_steps=2",
        "model.saliency.projector_steps=0",
        "trainer.val_check_interval=2",
        "callbacks.progress_bar=none",
        f"output_dir={output_dir}",
    ]
    assert train.main(overrides) == 0
    (new / "train.jsonl").write_text((root / "train.jsonl").read_text())
    write_split(new, "test", 1)  # a new video of the same id's name in another folder
    only_test = write_features(tmp_path / "new_features", ["test0"])
    given = [f"data.source.root={new}", f"data.source.feature_path={only_test}"]
    assert evaluate.main([str(output_dir), "--name", "new", *given]) == 0
    metrics = json.loads((output_dir / "eval" / "new" / "metrics.json").read_text())
    assert metrics["test/queries"] == 3 and "prior/mIoU" in metrics


def read_rows(path: Path) -> list[dict]:
    return [json.loads(row) for row in path.read_text().splitlines()]


def assert_scored_by(rows: list[dict], metrics: dict, mode: str, path: Path) -> None:
    """Each row's IoU is its prediction's by ``mode``, the test mIoU is their mean, and rescoring the
    predictions file gives the run's own scores."""
    rescored = rescore(path, EXACT)
    for key in ("R1@0.3", "R1@0.5", "R1@0.7", "mIoU", "parse_fail"):
        assert rescored[key] == pytest.approx(metrics[f"test/{key}"], abs=1e-4), (
            key
        )  # float32 in metrics.json
    assert rescored["multi_window"] == mode and rescored["queries"] == metrics["test/queries"]
    for row in rows:
        windows = [tuple(w) for w in row.get("windows", [row["gt"]])]
        expected = multi_window_iou(tuple(row["pred"]), windows, mode)
        assert row["iou"] == pytest.approx(expected, abs=1e-3)  # pred is rounded to ms in the row
    assert metrics["test/mIoU"] == pytest.approx(100 * sum(r["iou"] for r in rows) / len(rows), abs=1e-3)
