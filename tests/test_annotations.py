"""Charades-STA / ActivityNet Captions parsers, quirk policy and prompt helpers."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from datamodules.activitynet import load_activitynet, parse_activitynet
from datamodules.annotation_source import AnnotationSpec, CharadesSpec, annotation_source
from datamodules.charades_sta import load_charades_sta, parse_charades_sta, read_durations
from datamodules.quirks import QuirkError, QuirkPolicy
from grounding.answer_format.prompts import DEFAULT_TEMPLATE, normalize_query, render_prompt

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CHARADES, ANET = DATA / "charades_sta", DATA / "activitynet_captions"

CSV = "id,subject,length\r\nAAAAA,x,10.0\r\nBBBBB,y,20.5\r\nCCCCC,z,n/a\r\n"
STA_LINES = [
    "AAAAA 1.0 4.5##a person opens a door.",  # 1 clean
    "AAAAA 6.0 3.0##person sits down.",  # 2 start > end
    "BBBBB 18.0 21.0##someone drinks",  # 3 end past duration
    "BBBBB 21.0 22.0##person leaves.",  # 4 start past duration
    "ZZZZZ 1.0 2.0##unknown video.",  # 5 unknown video id
    "AAAAA 1.0 2.0## . ",  # 6 empty sentence
]


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode())
    return path


@pytest.fixture
def sta(tmp_path: Path) -> tuple[Path, dict]:
    write(tmp_path / "Charades_v1_train.csv", CSV)
    path = write(tmp_path / "charades_sta_train.txt", "\n".join(STA_LINES) + "\n")
    return path, read_durations([tmp_path / "Charades_v1_train.csv"], strict=False)


def test_read_durations_parses_crlf_csv(sta):
    _, durations = sta
    assert durations == {"AAAAA": 10.0, "BBBBB": 20.5}  # CCCCC's length n/a: no duration (strict=False)


def test_a_csv_length_left_out_is_logged_with_its_row(sta, caplog):
    """Before: with strict=false the row was left out without a word."""
    path, _ = sta
    csv_path = path.parent / "Charades_v1_train.csv"
    with caplog.at_level(logging.WARNING):
        read_durations([csv_path], strict=False)
    assert f"{csv_path}:4: video CCCCC: length 'n/a' is not a duration in seconds > 0" in caplog.text


def test_a_csv_length_that_is_no_duration_names_the_csv_row(sta):
    """Before: the length became None silently; the error named the first query of the video."""
    path, _ = sta
    csv_path = path.parent / "Charades_v1_train.csv"
    with pytest.raises(QuirkError, match=f"^{csv_path}:4: video CCCCC: length 'n/a' is not a duration"):
        load_charades_sta(path.parent, "train")


def test_a_csv_line_that_is_not_utf8_names_the_csv_row(tmp_path, caplog):
    """Before: a UnicodeDecodeError traceback (docs/datasets.md promises file:line)."""
    csv_path = tmp_path / "Charades_v1_train.csv"
    csv_path.write_bytes(CSV.replace("BBBBB,y", "BBBBB,\xff").encode("latin-1"))
    with pytest.raises(QuirkError, match=f"^{csv_path}:3: malformed annotation: not UTF-8 \\(byte 0xff"):
        read_durations([csv_path])
    with caplog.at_level(logging.WARNING):
        assert read_durations([csv_path], strict=False) == {"AAAAA": 10.0}
    assert f"{csv_path}: malformed: 1 skipped, e.g. {csv_path}:3 (not UTF-8" in caplog.text
    assert f"{csv_path}:4: video CCCCC" in caplog.text  # the lines after it keep their numbers


@pytest.mark.parametrize(
    ("actions", "message"),
    [(b"c001 1 2\xe9", "not UTF-8 (byte 0xe9)"), (b"c001 1", "expected 'cNNN start end'")],
)
def test_a_bad_action_timeline_line_is_a_quirk_error_naming_it(tmp_path, actions, message):
    """Before: a UnicodeDecodeError or ValueError traceback in a features=action_trace run."""
    csv_path = tmp_path / "Charades_v1_train.csv"
    csv_path.write_bytes(b"id,actions,length\nAAAAA,c002 0 1,10\nBBBBB," + actions + b",20\n")
    source = annotation_source("charades_sta", CharadesSpec(str(tmp_path), {"train": "train"}))
    with pytest.raises(QuirkError, match=f"^{csv_path}:3: {re.escape(message)}"):
        _ = source.timelines


def test_a_missing_csv_is_named_when_a_video_has_no_duration(tmp_path):
    """Before: ``unknown video: video BBBBB has no usable duration``, not naming the missing CSV."""
    write(tmp_path / "Charades_v1_test.csv", "id,length\nAAAAA,10.0\n")
    write(tmp_path / "charades_sta_train.txt", "AAAAA 1.0 2.0##x\nBBBBB 1.0 2.0##y\n")
    missing = tmp_path / "Charades_v1_train.csv"
    with pytest.raises(
        QuirkError,
        match=f":2: unknown video: BBBBB has no usable duration in the CSVs read \\(no such file {missing}\\)$",
    ):
        load_charades_sta(tmp_path, "train")
    records, report = load_charades_sta(tmp_path, "train", QuirkPolicy(unknown_video="drop"))
    assert len(records) == 1 and report.counts == {"unknown_video": 1}
    write(tmp_path / "Charades_v1_test.csv", "id,length\nAAAAA,10.0\nBBBBB,abc\n")  # there, but unusable
    with pytest.raises(
        QuirkError, match="BBBBB has no usable duration in the CSVs read"
    ):  # was: "no duration"
        load_charades_sta(tmp_path, "train", QuirkPolicy(strict=False))


def test_charades_default_policy_counts_every_quirk(sta):
    path, durations = sta
    records, report = parse_charades_sta(path, durations, "train", QuirkPolicy(unknown_video="drop"))
    by_qid = {r.qid: r for r in records}
    assert sorted(by_qid) == ["charades:train:000001", "charades:train:000002", "charades:train:000003"]
    assert (by_qid["charades:train:000002"].start, by_qid["charades:train:000002"].end) == (3.0, 6.0)
    assert by_qid["charades:train:000003"].end == 20.5
    assert by_qid["charades:train:000001"].query == "a person opens a door."
    assert report.counts == {
        "start_after_end": 1,
        "end_after_duration": 1,
        "start_after_duration": 1,
        "unknown_video": 1,
        "empty_query": 1,
    }
    assert (report.read, report.kept, report.dropped) == (6, 3, 3)
    assert f"{path}:2" in report.examples["start_after_end"][0]


def test_charades_drop_policy(sta):
    path, durations = sta
    policy = QuirkPolicy(start_after_end="drop", end_after_duration="drop", unknown_video="drop")
    records, report = parse_charades_sta(path, durations, "train", policy)
    assert [r.qid for r in records] == ["charades:train:000001"]
    assert report.actions["start_after_end"] == "dropped" and report.dropped == 5


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        (QuirkPolicy(unknown_video="error"), ":5: unknown video: video ZZZZZ"),
        (QuirkPolicy(unknown_video="drop", empty_query="error"), ":6: empty query"),
    ],
)
def test_charades_error_policies_name_file_and_line(sta, policy, message):
    path, durations = sta
    with pytest.raises(QuirkError, match=str(path) + message):
        parse_charades_sta(path, durations, "train", policy)


@pytest.mark.parametrize(
    "bad", ["AAAAA 1.0 2.0 a person", "AAAAA 1.0##x", "AAAAA one 2.0##x", "AAAAA -1 2##x"]
)
def test_charades_malformed_line(tmp_path, bad):
    path = write(tmp_path / "sta.txt", f"AAAAA 1.0 2.0##fine.\n\n{bad}\n")
    with pytest.raises(QuirkError, match=f"{path}:3: malformed"):
        parse_charades_sta(path, {"AAAAA": 10.0}, "test")
    records, report = parse_charades_sta(path, {"AAAAA": 10.0}, "test", QuirkPolicy(strict=False))
    assert len(records) == 1 and report.counts == {"malformed": 1} and report.read == 2


def test_charades_zero_length_and_non_utf8_lines(tmp_path):
    path = tmp_path / "sta.txt"
    path.write_bytes(b"AAAAA 1.0 2.0##fine.\nAAAAA 3.0 3.0##a point.\nAAAAA 1.0 2.0##caf\xe9.\n")
    with pytest.raises(QuirkError, match=f"{path}:3: malformed annotation: not UTF-8 \\(byte 0xe9"):
        parse_charades_sta(path, {"AAAAA": 10.0}, "test")
    records, report = parse_charades_sta(path, {"AAAAA": 10.0}, "test", QuirkPolicy(strict=False))
    assert len(records) == 1 and report.counts == {"zero_length": 1, "malformed": 1}
    with pytest.raises(QuirkError, match=f"{path}:2: zero length: AAAAA"):
        parse_charades_sta(path, {"AAAAA": 10.0}, "test", QuirkPolicy(zero_length="error"))


def test_activitynet_non_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "val_1.json"
    path.write_bytes(b'{"v_a": {"duration": 9.0,\n "timestamps": [[1, 2]], "sentences": ["caf\xe9"]}}')
    with pytest.raises(QuirkError, match=f"{path}:2: not UTF-8 \\(byte 0xe9\\)"):
        parse_activitynet(path, "val_1")


def test_load_charades_requires_csv(tmp_path):
    write(tmp_path / "charades_sta_test.txt", "AAAAA 1.0 2.0##x\n")
    with pytest.raises(FileNotFoundError, match="Charades_v1"):
        load_charades_sta(tmp_path, "test")
    with pytest.raises(ValueError, match="split"):
        load_charades_sta(tmp_path, "val")


def anet_file(tmp_path: Path, data: object) -> Path:
    return write(tmp_path / "val_1.json", json.dumps(data))


def test_activitynet_quirks_and_qids(tmp_path):
    path = anet_file(
        tmp_path,
        {
            "v_a": {
                "duration": 70.28999999999999,
                "timestamps": [[0, 10], [30, 20.5], [60, 70.29], [65, 71.5], [71, 80]],
                "sentences": ["A man talks.", " He sits.", " Float noise.", " Past end.", " Outside."],
            },
            "v_b": {"timestamps": [[1, 2]], "sentences": ["No duration."]},
            "v_c": {"duration": 5.0, "timestamps": [[1, 2]], "sentences": ["   "]},
        },
    )
    records, report = parse_activitynet(path, "val_1", QuirkPolicy(unknown_video="drop"))
    assert [r.qid for r in records] == [f"anet:val_1:v_a:{i}" for i in range(4)]
    assert records[1].query == "He sits." and (records[1].start, records[1].end) == (20.5, 30.0)
    assert records[2].end == records[3].end == 70.28999999999999
    assert report.counts == {
        "start_after_end": 1,
        "end_after_duration": 1,  # float noise (70.29 vs 70.28999999999999) is not a quirk
        "start_after_duration": 1,
        "unknown_video": 1,
        "empty_query": 1,
    }
    assert f"{path}:v_a[3]" in report.examples["end_after_duration"][0]


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"v_a": {"duration": 9.0, "timestamps": [[1, 2]], "sentences": []}}, ":v_a: malformed"),
        ({"v_a": {"duration": 9.0, "timestamps": [[1]], "sentences": ["x"]}}, r":v_a\[0\]: malformed"),
        ({"v_a": {"duration": 9.0, "timestamps": [[1, 2]], "sentences": [3]}}, r":v_a\[0\]: malformed"),
        ({"v_a": [1, 2]}, ":v_a: malformed"),
    ],
)
def test_activitynet_malformed(tmp_path, data, where):
    path = anet_file(tmp_path, data)
    with pytest.raises(QuirkError, match=str(path) + where):
        parse_activitynet(path, "val_1")
    records, report = parse_activitynet(path, "val_1", QuirkPolicy(strict=False))
    assert records == [] and report.counts == {"malformed": 1}


@pytest.mark.parametrize("duration", ["30.0", True, [30]])
def test_an_activitynet_duration_that_is_no_number_is_malformed(tmp_path, duration):
    """Before: an "unknown video" (no usable duration), an error whatever the policy."""
    path = anet_file(
        tmp_path, {"v_a": {"duration": duration, "timestamps": [[1, 2], [3, 4]], "sentences": ["x", "y"]}}
    )
    with pytest.raises(QuirkError, match=f"{path}:v_a: malformed annotation: 'duration' must be a number"):
        parse_activitynet(path, "val_1")
    records, report = parse_activitynet(path, "val_1", QuirkPolicy(strict=False))
    assert records == [] and report.counts == {"malformed": 2}


def test_activitynet_mismatched_lists_count_every_query_skipped(tmp_path):
    path = anet_file(
        tmp_path,
        {
            "v_a": {"duration": 9.0, "timestamps": [[1, 2], [3, 4], [5, 6]], "sentences": ["a.", "b."]},
            "v_b": {"duration": 9.0, "timestamps": [[1, 2]], "sentences": ["c."]},
        },
    )
    records, report = parse_activitynet(path, "val_1", QuirkPolicy(strict=False))
    assert [r.qid for r in records] == ["anet:val_1:v_b:0"]
    assert report.counts == {"malformed": 3} and (report.read, report.kept, report.dropped) == (4, 1, 3)


def test_activitynet_video_named_twice_names_it(tmp_path):
    """Before: JSON kept the second entry; the first one's queries vanished uncounted."""
    entry = '{"duration": 9.0, "timestamps": [[1, 2]], "sentences": ["a."]}'
    path = write(tmp_path / "train.json", f'{{"v_a": {entry},\n"v_a": {entry}}}')
    with pytest.raises(QuirkError, match=f"{path}: key 'v_a' appears twice in one object"):
        parse_activitynet(path, "train", QuirkPolicy(strict=False))


def test_activitynet_invalid_json_names_file(tmp_path):
    path = write(tmp_path / "train.json", '{"v_a": {"duration": 3.0,\n oops}')
    with pytest.raises(QuirkError, match=f"{path}:2: not valid JSON"):
        parse_activitynet(path, "train")


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({}, "(the test split: data.source.splits.test=val_2)"),
        ({"val_2": "fixed.json"}, "(the test split: data.source.annotation_files.val_2=fixed.json)"),
    ],
)
def test_a_missing_activitynet_file_names_its_split_and_key(tmp_path, files, message):
    """Before: ``[Errno 2] No such file or directory: '.../val_2.json'``, naming no split or key."""
    for split in ("train", "val_1"):
        write(
            tmp_path / f"{split}.json",
            json.dumps({"v_a": {"duration": 9.0, "timestamps": [[1, 2]], "sentences": ["x"]}}),
        )
    missing = tmp_path / files.get("val_2", "val_2.json")
    with pytest.raises(
        FileNotFoundError, match=f"^{missing}: no such annotation file \\(the val_2 split\\)$"
    ):
        load_activitynet(tmp_path, "val_2", annotation_file=files.get("val_2"))
    splits = {"train": "train", "val": "val_1", "test": "val_2"}
    source = annotation_source("activitynet", AnnotationSpec(str(tmp_path), splits, annotation_files=files))
    with pytest.raises(FileNotFoundError) as error:
        source.records("test")
    assert str(error.value) == f"{missing}: no such annotation file {message}"


def test_policy_rejects_unknown_options():
    with pytest.raises(ValueError, match="start_after_end"):
        QuirkPolicy(start_after_end="clip")


def test_report_logs_one_line_per_kind(sta, caplog):
    path, durations = sta
    _, report = parse_charades_sta(path, durations, "train", QuirkPolicy(unknown_video="drop"))
    with caplog.at_level(logging.INFO):
        report.log()
    assert len(caplog.records) == 1 + 5
    assert "kept 3 of 6 queries (3 dropped)" in caplog.records[0].getMessage()


def test_normalize_and_render_prompt():
    assert normalize_query("  A Person opens  the door.. ") == "a person opens the door"
    assert normalize_query(" . ") == ""
    prompt = render_prompt(DEFAULT_TEMPLATE, " He {braces} it.")
    assert prompt.startswith("<video>\n") and "see he {braces} it occurring?" in prompt
    with pytest.raises(ValueError, match="<video>"):
        render_prompt("{query}", "x")
    with pytest.raises(ValueError, match="query"):
        render_prompt("<video> what?", "x")


def needs(path: Path):
    return pytest.mark.skipif(not path.is_file(), reason=f"real annotation file absent: {path}")


@pytest.mark.real_data
@needs(CHARADES / "charades_sta_train.txt")
def test_real_charades_train():
    records, report = load_charades_sta(CHARADES, "train")
    assert report.read == 12408
    assert report.counts == {"start_after_end": 4, "end_after_duration": 1802, "start_after_duration": 3}
    # After swapping, 3 of the 4 reversed lines lie wholly past the video's end: dropped, and their
    # end > length is counted there, hence 1802 + 3 = the 1,805 known end > length queries.
    assert [e.split(" ")[0].rsplit(":", 1)[1] for e in report.examples["start_after_end"]] == [
        "8252",
        "8440",
        "9623",
    ]
    assert len(records) == report.kept == 12405
    assert len({r.qid for r in records}) == 12405
    assert len({r.video_id for r in records}) == 5338 - 2  # LEOL6 and AKKWU had only those lines


@pytest.mark.real_data
@needs(CHARADES / "charades_sta_train.vslnet_fixed.txt")
def test_real_charades_train_vslnet_fixed_keeps_all():
    records, report = load_charades_sta(
        CHARADES, "train", annotation_file="charades_sta_train.vslnet_fixed.txt"
    )
    assert len(records) == 12408 and report.counts == {"end_after_duration": 1802}


@pytest.mark.real_data
@needs(CHARADES / "charades_sta_test.txt")
def test_real_charades_test():
    records, report = load_charades_sta(CHARADES, "test")
    assert len(records) == report.read == 3720 and report.counts == {"end_after_duration": 562}
    assert len({r.video_id for r in records}) == 1334


@pytest.mark.real_data
@pytest.mark.parametrize(
    ("split", "total", "counts"),
    [
        # train: two moments of zero length ([34.77, 34.77] and [4.97, 4.97]), dropped
        ("train", 37421, {"start_after_end": 2, "end_after_duration": 29, "zero_length": 2}),
        ("val_1", 17505, {"end_after_duration": 5}),
        ("val_2", 17031, {"end_after_duration": 1}),
    ],
)
def test_real_activitynet(split, total, counts):
    if not (ANET / f"{split}.json").is_file():
        pytest.skip(f"real annotation file absent: {ANET / f'{split}.json'}")
    records, report = load_activitynet(ANET, split)
    assert report.read == total and len(records) == report.kept == total - counts.get("zero_length", 0)
    assert report.counts == counts
    assert all(0 <= r.start <= r.end <= r.duration for r in records)
