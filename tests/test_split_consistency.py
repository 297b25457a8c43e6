"""Warnings that only the splits together can give: a video with two durations, a test query that is also
a training query, a test video that is also a training video. Each is counted and logged with examples
naming ``file:line``; real data (the built-in, Charades-STA) gives none."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from datamodules.consistency import (
    consistency_warnings,
    duration_conflicts,
    seen_in_training,
    videos_seen_in_training,
)
from grounding.records import GroundingRecord
from timerefine.pipeline.build import build_datamodule
from timerefine.pipeline.config import load_config


def record(qid: str, video: str, query: str, duration: float = 20.0, where: str = "") -> GroundingRecord:
    return GroundingRecord(qid, video, query, duration, 1.0, 5.0, where=where)


def test_a_video_with_two_durations_is_named_with_both_places():
    splits = {
        "train": [
            record("a", "v1", "q", 20.0, "train.jsonl:1"),
            record("b", "v1", "r", 20.0, "train.jsonl:2"),
        ],
        "test": [record("c", "v1", "s", 24.0, "test.jsonl:3"), record("d", "v2", "s", 7.0, "test.jsonl:4")],
    }
    assert duration_conflicts(splits) == ["video v1: duration 24 at test.jsonl:3 but 20 at train.jsonl:1"]
    assert duration_conflicts({"train": splits["train"]}) == []
    # before: one odd line counted twice, itself and the next query agreeing with the first
    splits["test"].append(record("e", "v1", "t", 20.0, "test.jsonl:5"))
    assert len(duration_conflicts(splits)) == 1


def test_a_test_query_seen_in_training_is_found_whatever_its_case_and_period():
    splits = {
        "train": [record("a", "v1", "A person opens the door.", where="train.jsonl:1")],
        "val": [record("b", "v1", "a person opens the door", where="val.jsonl:1")],
        "test": [
            record("c", "v1", "a person closes the door", where="test.jsonl:1"),
            record("d", "v2", "a person opens the door", where="test.jsonl:2"),
        ],
    }
    found = seen_in_training(splits)
    assert list(found) == ["val"]
    assert found["val"][0].startswith("val.jsonl:1 = train.jsonl:1 (v1,")
    # val and test may share queries (Charades-STA validates on the first test queries)
    assert seen_in_training({"val": splits["val"], "test": splits["val"]}) == {}


def test_the_warnings_count_and_cap_their_examples():
    train = [record(f"t{i}", f"v{i}", "q", where=f"train.jsonl:{i}") for i in range(5)]
    test = [record(f"s{i}", f"v{i}", "q", 30.0, f"test.jsonl:{i}") for i in range(5)]
    durations, seen, videos = consistency_warnings("jsonl", {"train": train, "test": test})
    assert durations.startswith("jsonl: 5 queries give their video another duration")
    assert seen.startswith("jsonl test: 5 of 5 queries are also training queries")
    assert seen.count("test.jsonl:") == 3
    assert videos.startswith("jsonl test: 5 of 5 videos are also training videos") and "v2, v3" not in videos


def test_a_test_video_trained_on_with_other_queries_is_counted_once():
    """Review (datasets): a test video whose other queries were trained on passed without a word."""
    train = [record("t1", "v1", "a person opens the door"), record("t2", "v9", "someone sits")]
    test = [record("s1", "v1", "a person closes the door"), record("s2", "v1", "x"), record("s3", "v2", "y")]
    assert videos_seen_in_training({"train": train, "test": test}) == {"test": (["v1"], 2)}
    assert videos_seen_in_training({"train": train, "val": [record("s3", "v2", "y")]}) == {}


def write(path: Path, entries: list[dict]) -> None:
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))


def test_the_datamodule_logs_them_once_when_it_reads_the_splits(tmp_path, caplog):
    entry = {
        "qid": "q0",
        "query": "a person opens a door",
        "video_id": "v0",
        "duration": 20.0,
        "windows": [2.0, 8.0],
    }
    write(tmp_path / "train.jsonl", [entry, entry | {"qid": "q1", "query": "someone sits"}])
    write(tmp_path / "val.jsonl", [entry | {"qid": "q2", "video_id": "v1"}])
    write(tmp_path / "test.jsonl", [entry | {"duration": 25.0}])
    cfg = load_config(
        [
            "data=jsonl",
            f"data.source.root={tmp_path}",
            "data.source.features=synthetic",
            "data.source.feature_dim=8",
            "data.source.num_frames=8",
        ]
    )
    datamodule = build_datamodule(cfg)
    with caplog.at_level(logging.WARNING):
        datamodule.setup("fit")
        datamodule.setup("test")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    test_file = tmp_path / "test.jsonl"
    assert any(f"video v0: duration 25 at {test_file}:1" in w for w in warnings)
    assert [w for w in warnings if "also training queries" in w] == [
        f"jsonl test: 1 of 1 queries are also training queries (same video and query), so their scores "
        f"measure memory, e.g. {test_file}:1 = {tmp_path / 'train.jsonl'}:1 (v0, 'a person opens a door')"
    ]


def test_the_built_in_data_warns_of_nothing(caplog):
    datamodule = build_datamodule(load_config(["experiment=tiny"]))
    with caplog.at_level(logging.WARNING):
        datamodule.setup()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
