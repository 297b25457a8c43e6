"""Charades action timelines, the simulated action detector (``features=action_trace``), the
query-free best action, the query leak controls, and the wrong-event / bad-boundaries diagnosis."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from omegaconf import OmegaConf

from callbacks.predictions_writer import PredictionsWriter
from datamodules import action_trace, feature_stores
from datamodules.action_trace import (
    ActionTraceFeatureStore,
    ActionTraceSpec,
    class_embeddings,
    confusable_classes,
    detect,
    evidence,
    trace,
)
from datamodules.query_control import QueryControlError, apply_query_control, shuffled_queries
from grounding.action_timelines import NUM_CLASSES, Action, Timeline, parse_actions, read_timelines
from grounding.metrics.action_prior import best_action_scores, pick_action, queried_class_rates
from grounding.metrics.prior import prior_scores
from grounding.records import FeatureError, GroundingRecord
from tests.charades_folder import TEST_QUERIES, TEST_ROWS, TRAIN_QUERIES, csv_text, write_charades
from timerefine.pipeline.baselines import baseline_scores
from timerefine.pipeline.build import build_source
from timerefine.pipeline.config import ConfigError, load_config
from timerefine.pipeline.errors import INPUT_ERRORS

CLEAN = ActionTraceSpec(jitter=0, miss_rate=0, confusion=0, false_per_minute=0, min_confidence=1, noise=0)


@pytest.fixture
def charades(tmp_path: Path) -> Path:
    return write_charades(tmp_path)


def source(root: Path, *overrides: str):
    cfg = load_config(
        ["data=charades_sta", f"data.source.root={root}", "data.source.features=action_trace", *overrides]
    )
    return build_source(cfg.data)


def timeline(actions: str = "c010 2.0 8.0;c020 5.0 20.0", duration: float = 30.0, video="V", split="train"):
    return Timeline(video, split, duration, parse_actions(actions, duration, "here"))


def test_actions_are_parsed_swapped_and_clipped():
    actions = parse_actions(
        "c092 11.90 21.20; c147 0.00 12.60;c005 9.0 4.0;c006 31 40;c007 28.0 35.5", 30.0, "f:2"
    )
    assert actions == (
        Action(92, 11.9, 21.2),
        Action(147, 0.0, 12.6),
        Action(5, 4.0, 9.0),  # reversed in the release: swapped
        Action(7, 28.0, 30.0),  # past the length: clipped; c006 lies wholly past it: dropped
    )
    assert parse_actions("", 10.0, "f:3") == ()


@pytest.mark.parametrize("cell", ["c92 1 2", "c157 1.0 2.0", "c001 1.0", "x001 1 2"])
def test_malformed_actions_name_the_line(cell):
    with pytest.raises(ValueError, match=r"^f:7: expected 'cNNN start end'"):
        parse_actions(cell, 10.0, "f:7")


def test_timelines_come_from_both_csvs(charades):
    (charades / "Charades_v1_test.csv").write_bytes(
        csv_text({**TEST_ROWS, "VIDB3": ("c001 1 2", "n/a")}).encode()
    )
    timelines = read_timelines([charades / "Charades_v1_train.csv", charades / "Charades_v1_test.csv"])
    assert set(timelines) == {"VIDA1", "VIDA2", "VIDA3", "VIDB1", "VIDB2"}  # VIDB3 has no length
    assert timelines["VIDB1"] == Timeline(
        "VIDB1", "test", 29.0, (Action(2, 3.0, 11.0), Action(1, 15.0, 29.0))
    )
    assert timelines["VIDA1"].split == "train"
    (charades / "bad.csv").write_text("id,length\n")
    with pytest.raises(ValueError, match=r"bad\.csv: expected 'id', 'actions' and 'length'"):
        read_timelines([charades / "bad.csv"])


def test_a_clean_detector_reports_the_annotations():
    video = timeline()
    detections = detect(video, CLEAN, seed=0)
    assert [(d.label, d.start, d.end, d.confidence) for d in detections] == [
        (10, 2.0, 8.0, 1.0),
        (20, 5.0, 20.0, 1.0),
    ]
    times = np.linspace(0, 30, 301)
    sharp = evidence(detections, times, blur=0)
    assert sharp[:, 10].sum() == ((times >= 2) & (times <= 8)).sum() and sharp[:, [10, 20]].max() == 1
    assert np.count_nonzero(sharp[:, [c for c in range(NUM_CLASSES) if c not in (10, 20)]]) == 0
    blurred = evidence(detections, times, blur=1.0)[:, 20]  # rises and falls around [5, 20]
    assert blurred[50] == pytest.approx(0.5, abs=0.01) and blurred[125] > 0.99 and blurred[10] < 0.02
    assert np.all(np.diff(blurred[:125]) >= 0) and np.all(np.diff(blurred[125:]) <= 0)


def test_each_degradation_does_what_it_says():
    video = timeline(";".join(f"c{c:03d} {c % 7}.0 {c % 7 + 5}.0" for c in range(40)), duration=60.0)
    missed = detect(video, dataclasses.replace(CLEAN, miss_rate=1.0), 0)
    assert missed == []
    swapped = detect(video, dataclasses.replace(CLEAN, confusion=1.0, confusable=2), 0)
    partners = confusable_classes(0, 2)
    assert all(d.label in partners[a.label] for d, a in zip(swapped, video.actions, strict=True))
    jittered = detect(video, dataclasses.replace(CLEAN, jitter=0.2), 0)
    assert [d.label for d in jittered] == [a.label for a in video.actions]
    moved = [abs(d.start - a.start) for d, a in zip(jittered, video.actions, strict=True)]
    assert 0 < np.mean(moved) < 2.0 and all(0 <= d.start <= d.end <= 60 for d in jittered)
    spurious = detect(timeline("", duration=60.0), dataclasses.replace(CLEAN, false_per_minute=30.0), 0)
    assert 15 < len(spurious) < 50 and all(6 - 1e-9 <= d.end - d.start <= 24 + 1e-9 for d in spurious)
    weak = detect(video, dataclasses.replace(CLEAN, min_confidence=0.5), 0)
    assert all(0.5 <= d.confidence <= 1 for d in weak) and len({d.confidence for d in weak}) > 1
    assert confusable_classes(0, 3).shape == (NUM_CLASSES, 3)
    assert all(c not in row and len(set(row)) == 3 for c, row in enumerate(confusable_classes(0, 3)))


def test_draws_are_per_seed_split_and_video_and_knobs_do_not_disturb_each_other():
    spec, video = ActionTraceSpec(), timeline()
    assert np.array_equal(trace(video, spec, 0, 50), trace(video, spec, 0, 50))
    for other in (dataclasses.replace(video, split="test"), dataclasses.replace(video, video_id="W")):
        assert not np.allclose(trace(other, spec, 0, 50), trace(video, spec, 0, 50))
    assert not np.allclose(trace(video, spec, 1, 50), trace(video, spec, 0, 50))
    # Noise draws from its own stream: the detections do not move when it changes.
    assert detect(video, dataclasses.replace(spec, noise=0.5), 0) == detect(video, spec, 0)
    quiet, loud = (trace(video, dataclasses.replace(spec, noise=n), 0, 50) for n in (0.0, 0.5))
    assert 0.4 < np.std(loud - quiet) < 0.6


def test_store_embeds_the_evidence_and_names_unknown_videos():
    video = timeline()
    store = ActionTraceFeatureStore({"V": video}, num_frames=20, feature_dim=32, seed=3)
    features = store.load("V")
    assert features.shape == (20, 32) and features.dtype == np.float32
    expected = trace(video, ActionTraceSpec(), 3, 20) @ class_embeddings(3, 32)
    assert np.allclose(features, expected, atol=1e-5)
    assert np.allclose(np.linalg.norm(class_embeddings(3, 32), axis=1), 1.0)
    with pytest.raises(FeatureError, match=r"'W'.*action_trace:seed=3.*missing"):
        store.load("W")


def test_store_traces_each_video_once_up_to_the_cache_budget(monkeypatch):
    monkeypatch.setattr(feature_stores, "GENERATED_CACHE_BYTES", 2 * 20 * 32 * 4)  # two videos' features
    videos = {name: dataclasses.replace(timeline(), video_id=name) for name in "ABC"}
    store, traced = ActionTraceFeatureStore(videos, num_frames=20, feature_dim=32, seed=3), []

    def counted(video: Timeline, spec: ActionTraceSpec, seed: int, num_frames: int) -> np.ndarray:
        traced.append(video.video_id)
        return trace(video, spec, seed, num_frames)

    monkeypatch.setattr(action_trace, "trace", counted)
    first = [store.load(name) for name in "ABCABC"]
    assert traced == ["A", "B", "C", "C"]  # A and B are kept, C is traced at every load
    for name, features in zip("ABCABC", first, strict=True):
        np.testing.assert_array_equal(features, first["ABC".index(name)])


def test_action_trace_source_never_reads_the_query(charades):
    loaded = source(charades, "data.source.feature_dim=16", "data.source.num_frames=10")
    records = loaded.records("test")
    assert [r.video_id for r in records] == ["VIDB1", "VIDB1", "VIDB2", "VIDB2"]
    features = {v: loaded.store("test").load(v) for v in ("VIDA1", "VIDB1")}
    assert features["VIDB1"].shape == (10, 16)
    lines = [line.replace("door", "window").replace("cup", "phone") for line in TEST_QUERIES]
    (charades / "charades_sta_test.txt").write_text("\n".join(lines) + "\n")
    reworded = source(charades, "data.source.feature_dim=16", "data.source.num_frames=10")
    assert reworded.records("test")[0].query == "person opens a window."
    assert all(np.array_equal(reworded.store("test").load(v), f) for v, f in features.items())
    # nor which of a video's actions are queried, nor when (features that showed only queried actions
    # would let a model choose among them without the query)
    fewer = [TEST_QUERIES[1], "VIDB2 2.0 6.0##sits."]
    (charades / "charades_sta_test.txt").write_text("\n".join(fewer) + "\n")
    other = source(charades, "data.source.feature_dim=16", "data.source.num_frames=10")
    assert [(r.video_id, r.start) for r in other.records("test")] == [("VIDB1", 15.0), ("VIDB2", 2.0)]
    assert all(np.array_equal(other.store("test").load(v), f) for v, f in features.items())


def test_action_trace_knobs_reach_the_store(charades):
    knobs = ("noise=0.0", "miss_rate=1.0", "false_per_minute=0.0")
    silent = source(charades, *(f"data.source.action_trace.{knob}" for knob in knobs))
    assert silent.store("train").spec == dataclasses.replace(
        ActionTraceSpec(), noise=0.0, miss_rate=1.0, false_per_minute=0.0
    )
    assert np.count_nonzero(silent.store("train").load("VIDA2")) == 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data=activitynet", "data.source.features=action_trace"], "needs data=charades_sta"),
        (
            ["data=charades_sta", "data.source.action_trace.miss_rate=1.5"],
            "data.source.action_trace.miss_rate",
        ),
        (
            ["data=charades_sta", "data.source.action_trace.confusable=0"],
            "data.source.action_trace.confusable",
        ),
        (["data=charades_sta", "data.source.action_trace.noise=-1"], "data.source.action_trace.noise"),
        (["data=charades_sta", "data.source.queries=none"], "data.source.queries=none: must be one of"),
        (["data=charades_sta", "+data.source.action_trace.nois=1"], "data.source.action_trace.nois"),
        # before: accepted, and read by nothing
        (
            ["data=charades_sta", "data.source.action_trace.blur=2"],
            "data.source.action_trace is read only with features=action_trace; with features=synthetic",
        ),
        (
            ["data=charades_sta", "data.source.features=action_trace", "data.source.synthetic_noise=0.2"],
            "data.source.synthetic_noise is read only with features=synthetic",
        ),
    ],
)
def test_bad_action_trace_settings_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(overrides)


def test_train_py_names_the_bad_knob(tmp_path, capsys):
    import train

    output_dir = tmp_path / "run"
    args = ["data=charades_sta", "data.source.action_trace.jitter=-0.1", f"output_dir={output_dir}"]
    assert train.main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["config error: data.source.action_trace.jitter=-0.1: must be a finite number >= 0"]
    assert not output_dir.exists()


def record(qid: str, video: str, query: str, start: float = 1.0, end: float = 2.0) -> GroundingRecord:
    return GroundingRecord(qid, video, query, 30.0, start, end)


def test_shuffled_queries_move_every_query_to_another_video():
    records = [record(f"q{i}", f"v{i % 5}", f"query {i}", i % 5, 10 + i % 5) for i in range(13)]
    shuffled = shuffled_queries(records, seed=0)
    assert [(r.qid, r.video_id, r.windows) for r in shuffled] == [
        (r.qid, r.video_id, r.windows) for r in records
    ]
    owner = {r.query: r.video_id for r in records}
    assert all(owner[s.query] != s.video_id for s in shuffled)
    assert sorted(r.query for r in shuffled) == sorted(r.query for r in records)
    assert shuffled == shuffled_queries(records, seed=0) != shuffled_queries(records, seed=1)
    with pytest.raises(ValueError, match="one video holds 3 of 4"):
        shuffled_queries(
            [record("a", "v", "x"), record("b", "v", "y"), record("c", "v", "z"), record("d", "w", "t")], 0
        )


def test_query_controls_per_split():
    records = [record("a", "v", "x"), record("b", "w", "y")]
    assert apply_query_control(records, "annotated", "test", 0) is records
    assert [r.query for r in apply_query_control(records, "empty", "train", 0)] == ["", ""]
    assert apply_query_control(records, "shuffled", "train", 0) is records  # training is untouched
    assert [r.query for r in apply_query_control(records, "shuffled", "val", 0)] == ["y", "x"]
    # before: a ValueError traceback from train.py and evaluate.py
    message = (
        "data.source.queries=shuffled: the test split cannot be shuffled among videos: one video holds 2 of 2"
    )
    with pytest.raises(QueryControlError, match=message.replace(".", r"\.")):
        apply_query_control([record("a", "v", "x"), record("b", "v", "y")], "shuffled", "test", 0)
    assert QueryControlError in INPUT_ERRORS


def test_the_source_applies_the_query_control(charades):
    assert [r.query for r in source(charades, "data.source.queries=empty").records("test")] == [""] * 4
    shuffled = source(charades, "data.source.queries=shuffled")
    assert [r.query for r in shuffled.records("train")] == [line.split("##")[1] for line in TRAIN_QUERIES]
    assert sorted(r.query for r in shuffled.records("test")) == sorted(q.split("##")[1] for q in TEST_QUERIES)


def test_the_best_action_is_the_most_often_named_class_fitted_on_train(charades):
    loaded = source(charades)
    train, test, timelines = loaded.records("train"), loaded.records("test"), loaded.timelines
    rates = queried_class_rates(train, timelines)
    # c002 is named in both videos holding it, c004 in one of two, c001 in one of two, c003 in none.
    assert rates == {1: 0.5, 2: 1.0, 3: 0.0, 4: 0.5}
    assert pick_action(timelines["VIDB1"], rates) == Action(2, 3.0, 11.0)
    assert pick_action(timelines["VIDB2"], rates) == Action(1, 9.0, 19.0)  # tie on the rate: the longer
    scores = best_action_scores(train, test, timelines)
    assert scores["mIoU"] == pytest.approx(50.0) and scores["R1@0.5"] == pytest.approx(50.0)
    assert best_action_scores(train, [record("x", "nowhere", "q")], timelines)["mIoU"] == 0.0


def test_the_baselines_are_scored_on_the_tested_queries_only(charades):
    """train.py and evaluate.py report them through one function: the queries a (limited) test scored,
    under the run's eval.protocol."""
    loaded = source(charades)
    train, test = loaded.records("train"), loaded.records("test")
    tested = PredictionsWriter(charades / "predictions")
    tested.qids = {test[0].qid, test[3].qid}
    trainer = SimpleNamespace(callbacks=[tested])
    datamodule = SimpleNamespace(source=loaded, records=loaded.records)
    cfg = OmegaConf.create({"eval": {"protocol": "exact"}})
    metrics = baseline_scores(cfg, trainer, datamodule)
    part = [test[0], test[3]]
    assert {k: metrics[f"best_action/{k}"] for k in ("mIoU", "R1@0.5")} == pytest.approx(
        {k: best_action_scores(train, part, loaded.timelines)[k] for k in ("mIoU", "R1@0.5")}
    )
    assert metrics["prior/mIoU"] == pytest.approx(prior_scores(train, part)["mIoU"])
