"""The text files datasets, requests and predictions come in (grounding/text_files.py and its readers):
a byte order mark, numbers as written, a video given two lengths, a JSON key named twice, a line named
when it is wrong."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from datamodules.activitynet import parse_activitynet
from datamodules.charades_sta import load_charades_sta, parse_charades_sta, read_durations
from datamodules.jsonl import parse_jsonl
from datamodules.quirks import QuirkError, QuirkPolicy
from grounding.action_timelines import read_timelines
from grounding.metrics.protocols import EXACT
from grounding.text_files import decoded_line, json_object_lines, seconds, utf8_text
from timerefine.inference.video_features import InputError
from timerefine.tools.predict import read_pairs
from timerefine.tools.rescore import PredictionsError, rescore

BOM = "\ufeff"
CSV = "id,subject,length\nAAAAA,x,10.0\nBBBBB,y,20.5\n"
ACTIONS_CSV = "id,actions,length\nAAAAA,c001 1.0 4.0,10.0\n"


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode())
    return path


def test_a_line_names_the_byte_that_is_not_utf8_past_a_byte_order_mark():
    assert decoded_line(b"\xef\xbb\xbfab", 1) == "ab" and decoded_line(b"\xef\xbb\xbfab", 2) == BOM + "ab"
    with pytest.raises(ValueError, match=r"^not UTF-8 \(byte 0xe9 at column 3\)"):
        decoded_line(b"\xef\xbb\xbfab\xe9", 1)  # before: the column and byte of the line without its mark


def test_a_byte_order_mark_starts_no_video_id_or_column(tmp_path):
    """Before: the first video was unknown (id '\\ufeffAAAAA'), and a CSV's first column '\\ufeffid'."""
    write(tmp_path / "Charades_v1_train.csv", BOM + CSV)
    write(tmp_path / "charades_sta_train.txt", BOM + "AAAAA 1.0 4.5##a person opens a door.\n")
    records, report = load_charades_sta(tmp_path, "train", QuirkPolicy(strict=False))
    assert [r.video_id for r in records] == ["AAAAA"] and report.counts == {}
    timelines = read_timelines([write(tmp_path / "Charades_v1_test.csv", BOM + ACTIONS_CSV)])
    assert list(timelines) == ["AAAAA"]  # before: "expected 'id', 'actions' and 'length' columns"


def test_whole_files_read_past_a_byte_order_mark(tmp_path):
    """Before: ActivityNet's JSON and a predictions file with one were 'not valid JSON'."""
    entry = {"v_a": {"duration": 9.0, "timestamps": [[1, 2]], "sentences": ["x"]}}
    records, _ = parse_activitynet(write(tmp_path / "val_1.json", BOM + json.dumps(entry)), "val_1")
    assert [r.qid for r in records] == ["anet:val_1:v_a:0"]
    row = {"pred": [1, 2], "gt": [1, 2], "duration": 3}
    assert rescore(write(tmp_path / "test.jsonl", BOM + json.dumps(row) + "\n"), EXACT)["mIoU"] == 100.0
    assert utf8_text(write(tmp_path / "x.txt", BOM + "a\nb")) == "a\nb"


@pytest.mark.parametrize("text", ["6_9", None, "", "six"])
def test_seconds_are_numbers_as_written(text):
    """Before: python's float read "6_9" as 69 s."""
    with pytest.raises(ValueError, match=r"not a number|could not convert"):
        seconds(text)
    assert seconds("6.9") == 6.9


def test_a_time_with_an_underscore_is_malformed(tmp_path):
    path = write(tmp_path / "sta.txt", "AAAAA 1.0 6_9##a person opens a door.\n")
    with pytest.raises(QuirkError, match=f"{path}:1: malformed annotation: times are not numbers"):
        parse_charades_sta(path, {"AAAAA": 100.0}, "test")


def test_a_video_given_two_lengths_names_both_rows(tmp_path, caplog):
    """Before: the last row's length won without a word, dropping and clipping that video's queries."""
    first = write(tmp_path / "Charades_v1_train.csv", "id,length\nAAAAA,10.0\nCCCCC,5.0\n")
    second = write(tmp_path / "Charades_v1_test.csv", "id,length\nBBBBB,20.5\nAAAAA,12.0\nCCCCC,5.0\n")
    with pytest.raises(
        QuirkError, match=f"^{second}:3: video AAAAA: length '12.0', another than on {first}:2"
    ):
        read_durations([first, second])
    with caplog.at_level(logging.WARNING):
        durations = read_durations([first, second], strict=False)
    assert durations == {"BBBBB": 20.5, "CCCCC": 5.0}  # the same length twice: kept
    assert f"{second}:3: video AAAAA" in caplog.text and "CCCCC" not in caplog.text


def test_a_length_that_is_no_duration_after_a_good_one_keeps_the_good_one(tmp_path, caplog):
    csv_path = write(tmp_path / "Charades_v1_train.csv", "id,length\nAAAAA,10.0\nAAAAA,abc\n")
    with caplog.at_level(logging.WARNING):
        assert read_durations([csv_path], strict=False) == {"AAAAA": 10.0}
    assert f"{csv_path}:3: video AAAAA: length 'abc' is not a duration" in caplog.text


def test_timelines_leave_out_a_video_given_two_lengths(tmp_path):
    """Before: the last row won, so action traces and diagnose-actions read another length than the
    annotations; a length written 6_9 was read as 69."""
    first = write(tmp_path / "Charades_v1_train.csv", ACTIONS_CSV + "BBBBB,,6_9\n")
    second = write(tmp_path / "Charades_v1_test.csv", "id,actions,length\nAAAAA,,12.0\nCCCCC,,8.0\n")
    assert list(read_timelines([first, second])) == ["CCCCC"]


def test_a_bad_pair_is_named_by_its_line(tmp_path):
    """Before: the last of a repeated "query" was grounded, the first unread; a missing video was named
    by its file alone; a name too long for the file system was an OSError traceback."""
    pairs = tmp_path / "pairs.jsonl"
    (tmp_path / "b.mp4").touch()
    pairs.write_text('{"video": "b.mp4", "query": "x"}\n{"video": "b.mp4", "query": "x", "query": "y"}\n')
    with pytest.raises(InputError, match=f"^{pairs}:2: key 'query' appears twice"):
        read_pairs(pairs)
    pairs.write_text('{"video": "a.mp4", "query": "x"}\n')
    with pytest.raises(InputError, match=f"^{pairs}:1: {tmp_path / 'a.mp4'}: no such file"):
        read_pairs(pairs)
    pairs.write_text(json.dumps({"video": "v" * 300 + ".mp4", "query": "x"}) + "\n")
    with pytest.raises(InputError, match=f"^{pairs}:1: .*: not a file name here"):
        read_pairs(pairs)


def test_a_prediction_naming_a_key_twice_is_refused(tmp_path):
    """Before: the last "pred" (null) was scored, a parse failure."""
    path = write(tmp_path / "test.jsonl", '{"pred": [0, 5], "gt": [2, 5], "duration": 10, "pred": null}\n')
    with pytest.raises(PredictionsError, match=f"^{path}:1: key 'pred' appears twice"):
        rescore(path, EXACT)


DEEP = '{"qid": "x", "windows": ' + "[" * 100_000 + "]" * 100_000 + "}"  # past Python's recursion limit


def test_json_nested_too_deeply_is_named_by_its_file_and_line(tmp_path):
    """Before: a RecursionError traceback (exit 1) from each reader; ``strict=false`` could not skip it."""
    good = {"qid": "a", "video_id": "v", "query": "x", "duration": 9, "windows": [[1, 2]]}
    lines = write(tmp_path / "train.jsonl", json.dumps(good) + "\n" + DEEP + "\n")
    with pytest.raises(QuirkError, match=f"^{lines}:2: malformed annotation: nested too deeply"):
        parse_jsonl(lines)
    records, report = parse_jsonl(lines, policy=QuirkPolicy(strict=False))
    assert [r.qid for r in records] == ["a"] and report.dropped == 1
    captions = write(tmp_path / "val_1.json", '{"v_a": ' + DEEP + "}")
    with pytest.raises(QuirkError, match=f"^{captions}: nested too deeply"):
        parse_activitynet(captions, "val_1")
    deep_first = write(tmp_path / "deep.jsonl", DEEP + "\n")
    with pytest.raises(InputError, match=f"^{deep_first}:1: nested too deeply"):
        read_pairs(deep_first)
    with pytest.raises(PredictionsError, match=f"^{deep_first}:1: nested too deeply"):
        rescore(deep_first, EXACT)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"a": 1}\n\nnot json\n', ":3: not JSON"),
        ('{"a": 1}\n[1, 2]\n', ":2: not a JSON object"),
        ('{"a": 1, "a": 2}\n', ":1: key 'a' appears twice"),
        ('{"a": 1}\n\xff\n', ":2: not UTF-8"),
    ],
)
def test_json_object_lines_names_the_line_that_is_no_object(tmp_path, text, message):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=f"^{path}{message}"):
        list(json_object_lines(path))


def test_json_object_lines_numbers_the_lines_it_reads(tmp_path):
    path = write(tmp_path / "rows.jsonl", BOM + '{"a": 1}\n\n  \n{"b": [2]}\n')
    assert list(json_object_lines(path)) == [(1, {"a": 1}), (4, {"b": [2]})]
