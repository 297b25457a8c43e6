"""Tiny Charades-STA annotation files written in tmp_path (no ../shared): short ``train.py`` runs on
packed features, splits without usable queries, and quirk drops in the coverage."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

import train
from datamodules.annotation_source import AnnotationSource, AnnotationSpec
from datamodules.datamodule import DataSpec, GroundingDataModule
from datamodules.feature_stores import PACKED_META
from grounding.answer_format.timeline import UNIFORM99
from grounding.records import EmptySplitError
from tests import helpers
from timerefine.tools.pack_features import pack_folder

DIM, FRAMES = 16, 8
TRAIN_VIDEOS, TEST_VIDEOS = ("TRA01", "TRA02", "TRA03", "TRA04"), ("TES01", "TES02")
SENTENCES = ("a person opens a door.", "someone sits on a chair.", "person holds a cup.")
CHARADES_SPLITS = {"train": "train", "val": "test", "test": "test"}


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
        "model.saliency.projector_steps=0",
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


def one_line_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_no_usable_training_query_is_a_one_line_error(tmp_path, capsys):
    root = charades_root(tmp_path / "charades")
    empty = feature_folder(tmp_path / "features", ())
    overrides = tiny_run(
        root,
        tmp_path / "run",
        "data.source.features=folder",
        f"data.source.feature_path={empty}",
        "data.source.strict=false",
    )
    assert train.main(overrides) == 2
    error = one_line_error(capsys)
    assert error.startswith(f"error: charades_sta train ({root / 'charades_sta_train.txt'}): ")
    assert "0 of 12 queries usable: 12 skipped (missing: 12)" in error and "TRA01" in error
    assert not (tmp_path / "run").exists()


def test_a_damaged_packed_store_is_a_one_line_error(tmp_path, capsys):
    """Before: a JSONDecodeError traceback."""
    (tmp_path / "packed").mkdir()
    (tmp_path / "packed" / PACKED_META).write_text('{"num_frames": 8, "feature_dim": 16, "ind')
    overrides = tiny_run(
        charades_root(tmp_path / "charades"),
        tmp_path / "run",
        "data.source.features=packed",
        f"data.source.feature_path={tmp_path / 'packed'}",
    )
    assert train.main(overrides) == 2
    assert one_line_error(capsys).startswith(f"error: {tmp_path / 'packed' / PACKED_META}: not JSON")


def test_eval_split_without_usable_query_is_named_before_anything_is_written(tmp_path, capsys):
    root = charades_root(tmp_path / "charades")
    folder = feature_folder(tmp_path / "features", TRAIN_VIDEOS)
    overrides = tiny_run(
        root,
        tmp_path / "run",
        "data.source.features=folder",
        f"data.source.feature_path={folder}",
        "data.source.strict=false",
    )
    assert train.main(overrides) == 2
    error = one_line_error(capsys)
    assert error.startswith("error: charades_sta val (") and "charades_sta_test.txt" in error
    assert "0 of 6 queries usable: 6 skipped (missing: 6)" in error
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_empty_builtin_split_is_a_one_line_error(tmp_path, capsys, split):
    output_dir = tmp_path / "run"
    assert train.main(["experiment=tiny", f"data.source.num_{split}=0", f"output_dir={output_dir}"]) == 2
    assert f"data.source.num_{split}=0" in one_line_error(capsys)
    assert not output_dir.exists()
    assert not output_dir.exists()


def test_queries_dropped_by_the_quirk_policy_count_in_the_coverage(tmp_path):
    root = charades_root(tmp_path / "charades")
    with open(root / "charades_sta_test.txt", "a") as annotations:
        annotations.write("TES01 1.0 2.0## . \n")  # an empty sentence: dropped by the default policy
    spec = AnnotationSpec(str(root), CHARADES_SPLITS, num_frames=FRAMES, feature_dim=DIM)
    source = AnnotationSource("charades_sta", spec)
    assert len(source.records("test")) == 6
    report = source.coverage["test"]
    assert (report.total, report.usable, report.skipped_by_reason) == (7, 6, {"empty_query": 1})
    assert "charades_sta_test.txt:7" in report.examples["empty_query"]
    data = DataSpec("charades_sta", spec, batch_size=4, eval_batch_size=4, timeline=UNIFORM99.name)
    coverage = GroundingDataModule(source, helpers.codec(), data, video_tokens=FRAMES, seed=0).coverage(
        {"test/queries": 6.0}
    )["test/coverage"]
    assert coverage == pytest.approx(100 * 6 / 7)


def test_annotation_file_without_queries_names_the_file(tmp_path):
    root = charades_root(tmp_path / "charades")
    (root / "charades_sta_test.txt").write_text("\n")
    source = AnnotationSource("charades_sta", AnnotationSpec(str(root), CHARADES_SPLITS))
    assert len(source.records("train")) == 12
    with pytest.raises(
        EmptySplitError, match=r"charades_sta test \(.*charades_sta_test.txt\): the annotations"
    ):
        source.records("test")


def test_a_split_name_the_dataset_lacks_is_one_line(tmp_path, capsys):
    """Before: a ValueError traceback, exit 1."""
    overrides = tiny_run(charades_root(tmp_path / "charades"), tmp_path / "run", "data.source.splits.val=val")
    assert train.main(overrides) == 2
    assert one_line_error(capsys) == (
        "error: data.source.splits.val=val: Charades-STA has no split 'val' (its splits: train, test)"
    )
    assert not (tmp_path / "run").exists()


def test_an_annotation_file_no_split_reads_is_named(tmp_path, caplog):
    """Before: my_val.txt, keyed by the framework's split name, was never opened, without a word. A
    warning, not an error: a shipped config's test file is unread when a run tests on val."""
    spec = AnnotationSpec(
        str(charades_root(tmp_path / "charades")), CHARADES_SPLITS, annotation_files={"val": "my_val.txt"}
    )
    with caplog.at_level(logging.WARNING):
        AnnotationSource("charades_sta", spec)
    assert (
        "data.source.annotation_files.val is read by no split (data.source.splits reads test, train)"
        in caplog.text
    )
