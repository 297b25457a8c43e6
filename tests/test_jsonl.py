"""data=jsonl: the parser (file:line errors, quirk policy, renamed keys, several windows), the source
built from the config (the converter from Charades-STA / ActivityNet Captions: test_to_jsonl.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import train
from datamodules.jsonl import load_jsonl, parse_jsonl
from datamodules.quirks import QuirkError, QuirkPolicy
from timerefine.pipeline.build import build_datamodule, build_module, build_source
from timerefine.pipeline.config import ConfigError, load_config
from timerefine.pipeline.conventions import recorded_conventions


def line(qid, spans, video="v1", query="a man opens a door", duration=30.0, **keys) -> str:
    """One JSONL query; ``keys`` renames fields as a file spells them."""
    names = {name: keys.get(name, name) for name in ("qid", "query", "video_id", "duration", "windows")}
    entry = {names["qid"]: qid, names["query"]: query, names["video_id"]: video}
    return json.dumps(entry | {names["duration"]: duration, names["windows"]: spans})


def write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_one_or_several_windows(tmp_path):
    path = write(
        tmp_path / "train.jsonl",
        [line("a", [[2, 7.5]]), "", line(7, [[0, 3], [10, 12]]), line("c", [4.0, 6.0], video=12)],
    )
    records, report = parse_jsonl(path)
    assert [(r.qid, r.video_id, r.windows) for r in records] == [
        ("a", "v1", ((2.0, 7.5),)),
        ("7", "v1", ((0.0, 3.0), (10.0, 12.0))),
        ("c", "12", ((4.0, 6.0),)),  # a single [start, end] is one window
    ]
    assert (records[1].start, records[1].end) == (0.0, 3.0)  # best: the targets use the first window
    assert (report.kept, report.read, report.counts) == (3, 3, {})


def test_union_targets_the_segment_that_covers_the_union_best(tmp_path):
    path = write(tmp_path / "train.jsonl", [line("a", [[0, 10], [12, 20]])])
    (record,), _ = parse_jsonl(path, multi_window="union")
    assert (record.start, record.end, record.multi_window) == (0.0, 20.0, "union")
    assert record.windows == ((0.0, 10.0), (12.0, 20.0))


def test_lighthouse_keys(tmp_path):
    lighthouse = {"video_id": "vid", "windows": "relevant_windows"}
    path = write(tmp_path / "val.jsonl", [line(37421, [[0.28, 55.15]], duration=55.15, **lighthouse)])
    (record,), _ = parse_jsonl(path, keys=lighthouse)
    assert (record.qid, record.video_id, record.start, record.end) == ("37421", "v1", 0.28, 55.15)
    with pytest.raises(QuirkError, match=r"val.jsonl:1: malformed annotation: missing key\(s\) \['video_id'"):
        parse_jsonl(path)
    with pytest.raises(ValueError, match=r"\['vid'\] are not JSONL fields"):
        parse_jsonl(path, keys={"vid": "video_id"})


def test_quirk_policy_applies_to_every_window(tmp_path):
    path = write(
        tmp_path / "train.jsonl",
        [
            line("swap", [[0, 3], [9, 6]]),  # 1: the second window reversed
            line("clip", [[25, 31]]),  # 2: ends past the 30-s video
            line("past", [[0, 3], [31, 32]]),  # 3: one window wholly past the end: the query goes
            line("empty", [[0, 3]], query=" . "),  # 4
        ],
    )
    records, report = parse_jsonl(path)
    assert {r.qid: r.windows for r in records} == {"swap": ((0.0, 3.0), (6.0, 9.0)), "clip": ((25.0, 30.0),)}
    assert report.counts == {
        "start_after_end": 1,
        "end_after_duration": 1,
        "start_after_duration": 1,
        "empty_query": 1,
    }
    assert (report.kept, report.read) == (2, 4)
    assert report.examples["start_after_duration"][0].startswith(f"{path}:3 ")
    dropped, report = parse_jsonl(path, QuirkPolicy(start_after_end="drop", end_after_duration="drop"))
    assert dropped == [] and report.read == 4


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ('{"qid": "x", "query": ', "not valid JSON"),
        (
            '{"qid": "x"',
            "not valid JSON: Expecting ',' delimiter (column 12)",
        ),  # before: column 1, past its end
        ("[1, 2]", "expected a JSON object, got list"),
        (line("x", [[1]]), "'windows' must be [start, end] or a non-empty list of them, got [[1]]"),
        (line("x", []), "'windows' must be"),
        (line("x", [[1, 2]], duration="30"), "'duration' must be a positive number of seconds"),
        # before: 'unknown video: ... has no usable duration', counted under the unknown-video policy
        (line("x", [[1, 2]], duration=0), "'duration' must be a positive number of seconds, got 0"),
        (line("x", [[1, 2]], duration=-5.0), "'duration' must be a positive number of seconds, got -5.0"),
        (line("x", [[1, 2]], video=""), "'video_id' must be a non-empty string or an integer, got ''"),
        (line("a", [[1, 2]]), "qid a repeats line 1"),
        # before: JSON kept the last window, the first unread
        (line("x", [[1, 2]])[:-1] + ', "windows": [[5, 6]]}', "key 'windows' appears twice"),
        (line("x", [[-1, 2]]), "bad times -1.0, 2.0"),
        # before: a ValueError traceback blaming the prompt template, when the prompt was made
        (line("x", [[1, 2]], query="opens <VIDEO> door"), "video v1: the query holds <video>, the prompt's"),
    ],
)
def test_malformed_lines_name_file_and_line_or_are_counted(tmp_path, bad, reason):
    path = write(tmp_path / "test.jsonl", [line("a", [[1, 2]]), bad, line("b", [[3, 4]])])
    with pytest.raises(QuirkError, match=re.escape(f"{path}:2: malformed annotation: ")) as error:
        parse_jsonl(path)
    assert reason in str(error.value)
    records, report = parse_jsonl(path, QuirkPolicy(strict=False))
    assert [r.qid for r in records] == ["a", "b"]
    assert report.counts == {"malformed": 1} and report.read == 3


def test_a_line_that_is_not_utf8_names_file_and_line_or_is_counted(tmp_path):
    path = tmp_path / "train.jsonl"
    latin1 = line("b", [[1, 2]], query="a cafe door").encode().replace(b"cafe", b"caf\xe9")  # not UTF-8
    path.write_bytes(b"\n".join([line("a", [[1, 2]]).encode(), latin1, line("c", [[3, 4]]).encode()]))
    with pytest.raises(QuirkError, match=re.escape(f"{path}:2: malformed annotation: not UTF-8 (byte 0xe9")):
        parse_jsonl(path)
    records, report = parse_jsonl(path, QuirkPolicy(strict=False))
    assert [r.qid for r in records] == ["a", "c"] and report.counts == {"malformed": 1}


def test_a_zero_length_window_drops_its_query_counted_or_is_an_error(tmp_path):
    path = write(
        tmp_path / "train.jsonl",
        [line("a", [[1, 2]]), line("point", [[5, 5]]), line("one_of_two", [[0, 3], [7.5, 7.5]])],
    )
    records, report = parse_jsonl(path)
    assert [r.qid for r in records] == ["a"]
    assert report.counts == {"zero_length": 2} and (report.read, report.dropped) == (3, 2)
    assert report.examples["zero_length"][0].startswith(f"{path}:2 (")
    with pytest.raises(QuirkError, match=re.escape(f"{path}:2: zero length: v1 [5.0, 5.0]")):
        parse_jsonl(path, QuirkPolicy(zero_length="error"))


def test_missing_split_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"val.jsonl: no such annotation file \(the val split\)"):
        load_jsonl(tmp_path, "val")


def source_config(*overrides: str):
    return load_config(["data=jsonl", *overrides, "output_dir=unused"])


def test_source_from_the_config_reads_splits_and_counts_coverage(tmp_path):
    for split in ("train", "val", "test"):
        write(
            tmp_path / f"{split}.jsonl", [line(f"{split}1", [[1, 4], [20, 25]]), line(f"{split}2", [[2, 9]])]
        )
    with open(tmp_path / "test.jsonl", "a") as f:
        f.write(line("dropped", [[1, 2]], query="") + "\n")
    cfg = source_config(f"data.source.root={tmp_path}", "data.source.multi_window=union")
    source = build_source(cfg.data)
    (first, _) = source.records("test")
    assert (first.windows, first.multi_window) == (((1.0, 4.0), (20.0, 25.0)), "union")
    report = source.coverage["test"]
    assert (report.total, report.usable, report.skipped_by_reason) == (3, 2, {"empty_query": 1})


def test_a_videos_synthetic_features_do_not_depend_on_which_file_val_reads(tmp_path):
    """Review: with splits.val=test (data=charades_sta's default) each test query's signature was added
    to its video twice: test frames carried twice the signal that training taught. So did val reading
    test's file by its own key (annotation_files.val), by another spelling of the same path too."""
    for split in ("train", "val", "test"):
        write(tmp_path / f"{split}.jsonl", [line(f"{split}1", [[1, 4]], video=f"{split}v")])
    features = []
    splits = "data.source.splits"
    for val in (f"{splits}.val=val", f"{splits}.val=test", "+data.source.annotation_files.val=./test.jsonl"):
        source = build_source(source_config(f"data.source.root={tmp_path}", val).data)
        features.append(source.store("test").load("testv"))
    assert all(np.array_equal(features[0], other) for other in features[1:])


def test_a_feature_path_the_features_do_not_read_is_warned_of(tmp_path, caplog):
    """Before: a user who gave their folder but not features=folder trained on synthetic features
    without a word (the path need not even exist)."""
    for split in ("train", "val", "test"):
        write(tmp_path / f"{split}.jsonl", [line(f"{split}1", [[1, 4]])])
    cfg = source_config(f"data.source.root={tmp_path}", "data.source.feature_path=/my/features")
    build_source(cfg.data).records("train")
    assert (
        "data.source.feature_path=/my/features is not read: features=synthetic are made here" in caplog.text
    )
    charades = ["data=charades_sta", f"data.source.root={tmp_path}", "data.source.features=action_trace"]
    build_source(load_config([*charades, "data.source.feature_path=/my/features"]).data)
    assert "feature_path=/my/features is not read: features=action_trace are made here" in caplog.text


# A tiny run on JSONL files in ``root`` whose LM takes 192 positions: a short query's prompt (about 60
# tokens with its 8 video tokens) and its answer (up to 77 generated tokens) fit, a query of 60 words
# (about 270 tokens) does not.
def tiny_jsonl(root: Path, *overrides: str) -> list[str]:
    return [
        "data=jsonl",
        f"data.source.root={root}",
        "data.source.num_frames=16",
        "data.source.feature_dim=16",
        "data.batch_size=4",
        "model.lm.tiny={hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}",
        "model.lm.tiny.max_positions=192",
        "model.lm.tokenizer_vocab_size=300",
        "trainer.accelerator=cpu",
        "trainer.max_steps=2",
        "model.saliency.projector_steps=0",
        "callbacks.progress_bar=none",
        *overrides,
    ]


LONG_QUERY = " ".join(["a person opens the door and then sits on a chair"] * 6)


def jsonl_splits(root: Path, bad_in: str = "train", bad: str = "") -> Path:
    """Four queries per split; the third of ``bad_in`` replaced by the line ``bad`` (bytes allowed)."""
    for split in ("train", "val", "test"):
        lines = [line(f"{split}{i}", [[i, i + 4]], video=f"{split}v{i}") for i in range(4)]
        (root / f"{split}.jsonl").parent.mkdir(parents=True, exist_ok=True)
        if split == bad_in:
            lines[2] = bad
        (root / f"{split}.jsonl").write_bytes("\n".join(lines).encode() + b"\n")
    return root / f"{bad_in}.jsonl"


@pytest.mark.parametrize(
    ("bad", "overrides", "message"),
    [
        (line("caf\udcff", [[2, 6]]), [], ":3: malformed annotation: not UTF-8 (byte 0xff at column"),
        (line("point", [[4, 4]]), ["data.source.quirks.zero_length=error"], ":3: zero length: v1 [4.0, 4.0]"),
        (line("long", [[2, 6]], query=LONG_QUERY), [], ":3: query too long: "),
        (line("video", [[2, 6]], query="a <video> of a door"), [], ":3: malformed annotation: video v1: the"),
        # before: trained on the end-of-text token where the query wrote </s>
        (line("eos", [[2, 6]], query="a door </s> opens"), [], ":3: the query holds '</s>', which the"),
    ],
    ids=["not_utf8", "zero_length", "too_long", "video_in_query", "special_token_in_query"],
)
def test_bad_training_data_stops_the_run_in_one_line(tmp_path, capsys, bad, overrides, message):
    path = jsonl_splits(tmp_path / "jsonl", bad=bad)
    path.write_bytes(path.read_bytes().replace(b"\\udcff", b"\xff"))  # a lone 0xff byte in a qid
    output_dir = tmp_path / "run"
    assert train.main([*tiny_jsonl(tmp_path / "jsonl", *overrides), f"output_dir={output_dir}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}{message}"), lines
    if "too long" in message:
        assert re.search(r"too long: the query is \d{3} tokens long; .* has 192 positions", lines[0]), lines[
            0
        ]
    assert not output_dir.exists()


def test_queries_too_long_for_the_lm_can_be_counted_skips(tmp_path, caplog):
    """``data.query_too_long=drop``: skipped, counted in the split's coverage, logged with an example;
    the check applies to the splits read before the model is built (train.py) and after (evaluate.py)."""
    path = jsonl_splits(tmp_path / "jsonl", "test", line("long", [[2, 6]], query=LONG_QUERY))
    cfg = load_config([*tiny_jsonl(tmp_path / "jsonl", "data.query_too_long=drop"), "output_dir=unused"])
    for read_first in (True, False):
        datamodule = build_datamodule(cfg)
        if read_first:
            datamodule.setup()
        with caplog.at_level("WARNING"):
            build_module(cfg, datamodule)
            test = datamodule.records("test")
        assert [r.qid for r in test] == ["test0", "test1", "test3"]
        assert datamodule.annotated("test") == 4  # coverage: 3 of 4 queries
        assert datamodule.coverage({"test/queries": 3}) == {"test/coverage": 75.0}
        warnings = [r.getMessage() for r in caplog.records if "query too long" in r.getMessage()]
        assert len(warnings) == 1 and f"{path}:3" in warnings[0] and "1 of 4 queries skipped" in warnings[0]
        caplog.clear()


@pytest.mark.parametrize("dataset", ["qvhighlights", "tacos", "didemo"])
def test_ready_layouts_read_lighthouse_files(tmp_path, dataset):
    cfg = load_config([f"data={dataset}", f"data.source.root={tmp_path}", "output_dir=unused"])
    lighthouse = {"video_id": "vid", "windows": "relevant_windows"}
    for own in set(cfg.data.source.splits.values()):
        entries = [line(1, [[0, 4], [10, 14]], **lighthouse), line(2, [[2, 6]], **lighthouse)]
        write(tmp_path / cfg.data.source.annotation_files[own], entries)
    source = build_source(cfg.data)
    assert [len(r.windows) for r in source.records("test")] == [2, 1]
    assert source.store("test").load("v1").shape == (cfg.data.source.num_frames, cfg.data.source.feature_dim)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.source.multi_window=mean", "data.source.multi_window=mean: must be one of best, union"),
        (
            "data.source.keys.video_id=null",
            "data.source.keys.video_id: field 'data.source.keys.video_id' is not",
        ),
        ("data.source.keys.video_id=''", "data.source.keys={'qid': 'qid', 'query': 'query', 'video_id': ''"),
        ("+data.source.keys.vid=video_id", "data.source.keys.vid: added with + but not a config key"),
        ("data.source.multi_windows=best", "multi_windows"),
    ],
)
def test_config_mistakes_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        source_config(override)


def test_charades_source_refuses_jsonl_keys():
    with pytest.raises(
        ConfigError, match=r"data\.source\.multi_window: Key 'multi_window' not in 'CharadesSpec'"
    ):
        load_config(["data=charades_sta", "data.source.multi_window=best", "output_dir=unused"])


def test_the_multi_window_rule_is_recorded_with_the_scores(tmp_path):
    """Before: ``metrics.json`` of a ``best`` and a ``union`` evaluation differed in their numbers only
    (found by a review); datasets of one window per query have no such key."""
    cfg = source_config(f"data.source.root={tmp_path}", "data.source.multi_window=union")
    assert recorded_conventions(cfg)["data/multi_window"] == "union"
    charades = load_config(["data=charades_sta", "output_dir=unused"])
    assert "data/multi_window" not in recorded_conventions(charades)
