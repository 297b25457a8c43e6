"""timerefine-to-jsonl: Charades-STA / ActivityNet Captions annotations written as data=jsonl files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datamodules.activitynet import load_activitynet
from datamodules.charades_sta import load_charades_sta
from datamodules.jsonl import load_jsonl
from datamodules.quirks import QuirkPolicy
from tests.test_jsonl import write
from timerefine.tools import to_jsonl

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CHARADES, ANET = DATA / "charades_sta", DATA / "activitynet_captions"

CSV = "id,subject,length\nAAAAA,x,10.0\nBBBBB,y,20.5\n"
STA = ["AAAAA 1.0 4.5##a person opens a door.", "AAAAA 6.0 3.0##person sits down.", "BBBBB 18.0 21.0##drinks"]
ANET_JSON = {
    "v_x": {"duration": 70.28999999999999, "timestamps": [[0, 10.5], [60, 70.29]], "sentences": ["A", " B."]},
    "v_y": {"duration": 12.0, "timestamps": [[3, 2]], "sentences": ["C"]},
}


def charades_root(root: Path) -> Path:
    write(root / "Charades_v1_train.csv", [CSV.strip()])
    write(root / "charades_sta_train.txt", STA)
    write(root / "charades_sta_test.txt", STA[:1])
    return root


def fields(records):
    return [(r.qid, r.video_id, r.query, r.duration, r.start, r.end, r.windows) for r in records]


def test_converted_charades_reads_back_as_the_parser_reads_it(tmp_path, capsys):
    root = charades_root(tmp_path / "charades")
    assert to_jsonl.main(["charades_sta", str(root), str(tmp_path / "out")]) == 0
    for split in ("train", "test"):
        converted, report = load_jsonl(tmp_path / "out", split)
        assert fields(converted) == fields(load_charades_sta(root, split)[0]) and report.counts == {}
    assert f"{tmp_path / 'out' / 'train.jsonl'}: 3 queries (0 of 3 dropped)" in capsys.readouterr().out


def test_converter_applies_the_quirk_policy(tmp_path, capsys):
    root = charades_root(tmp_path / "charades")
    argv = [
        "charades_sta",
        str(root),
        str(tmp_path / "out"),
        "--splits",
        "train",
        "--start-after-end",
        "drop",
    ]
    assert to_jsonl.main(argv) == 0
    assert [r.qid for r in load_jsonl(tmp_path / "out", "train")[0]] == [
        "charades:train:000001",
        "charades:train:000003",
    ]
    assert "2 queries (1 of 3 dropped)" in capsys.readouterr().out
    assert not (tmp_path / "out" / "test.jsonl").exists()


def test_converted_activitynet_keeps_its_times(tmp_path):
    root = tmp_path / "anet"
    write(root / "val_1.json", [json.dumps(ANET_JSON)])
    assert to_jsonl.main(["activitynet", str(root), str(tmp_path / "out")]) == 0
    converted, _ = load_jsonl(tmp_path / "out", "val_1")
    assert fields(converted) == fields(load_activitynet(root, "val_1")[0])
    assert converted[1].end == converted[1].duration == 70.28999999999999


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--splits", "val"],
            "error: charades_sta in {root}: --splits ['val']: charades_sta has ['train', 'test']",
        ),
        (["--unknown-video", "drop", "--splits", "train", "test"], None),
    ],
)
def test_converter_mistakes_are_one_line_errors(tmp_path, capsys, argv, message):
    root = charades_root(tmp_path / "charades")
    (root / "charades_sta_test.txt").write_text("ZZZZZ 1.0 2.0##unknown video.\n")
    code = to_jsonl.main(["charades_sta", str(root), str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err.strip()
    if message is None:  # an unknown video is dropped by the option, not an error
        assert code == 0 and not err
        return
    assert (code, err) == (2, message.format(root=root))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("below", "message"),
    [
        ("", "{taken} exists and is not a directory"),
        ("sub", "{taken} is a file, so no directory can be made below it"),
    ],
)
def test_converter_into_a_file_is_one_line(tmp_path, capsys, below, message):
    """Before: a FileExistsError traceback, exit 1; below the file, a NotADirectoryError traceback."""
    taken = tmp_path / "taken"
    taken.write_text("keep me\n")
    out = str(taken / below) if below else str(taken)
    assert to_jsonl.main(["charades_sta", str(charades_root(tmp_path / "charades")), out]) == 2
    assert capsys.readouterr().err.strip() == "error: " + message.format(taken=taken)
    assert taken.read_text() == "keep me\n"


def test_converter_writes_nothing_when_a_split_fails(tmp_path, capsys):
    root = charades_root(tmp_path / "charades")
    (root / "charades_sta_test.txt").write_text("ZZZZZ 1.0 2.0##unknown video.\n")
    assert to_jsonl.main(["charades_sta", str(root), str(tmp_path / "out")]) == 2
    assert "charades_sta_test.txt:1: unknown video" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.real_data
@pytest.mark.parametrize(
    ("dataset", "root", "kept"),
    [
        ("charades_sta", CHARADES, {"train": 12405, "test": 3720}),
        # ActivityNet train: 2 zero-length moments are dropped by the parser's default policy
        ("activitynet", ANET, {"train": 37419, "val_1": 17505, "val_2": 17031}),
    ],
)
def test_real_annotations_convert_with_every_query(tmp_path, dataset, root, kept):
    splits = to_jsonl.present_splits(dataset, root) if root.is_dir() else []
    if not splits:
        pytest.skip(f"real annotation files absent: {root}")
    assert to_jsonl.main([dataset, str(root), str(tmp_path), "--splits", *splits]) == 0
    for split in splits:
        records, report = load_jsonl(tmp_path, split)
        assert len(records) == report.read == kept[split] and report.counts == {}
        assert len({r.qid for r in records}) == kept[split]


def test_a_split_file_already_there_is_refused(tmp_path, capsys):
    """Before: a second conversion (another quirk policy) silently replaced train.jsonl in the folder."""
    root, out = charades_root(tmp_path / "charades"), tmp_path / "out"
    assert to_jsonl.main(["charades_sta", str(root), str(out), "--splits", "train"]) == 0
    first = (out / "train.jsonl").read_bytes()
    capsys.readouterr()
    argv = ["charades_sta", str(root), str(out), "--start-after-end", "drop"]
    assert to_jsonl.main(argv) == 2
    message = f"error: {out / 'train.jsonl'}: already written; convert into a new folder"
    assert capsys.readouterr().err.strip() == message
    assert (out / "train.jsonl").read_bytes() == first and not (out / "test.jsonl").exists()


def test_a_split_file_is_whole_or_absent(tmp_path, monkeypatch):
    """Before: the file was written in place, so a crash mid-write left half a split under its name."""

    def crash(path: Path, text: str, encoding: str) -> None:
        path.write_bytes(text[: len(text) // 2].encode(encoding))
        raise OSError("No space left on device")

    root, out = charades_root(tmp_path / "charades"), tmp_path / "out"
    monkeypatch.setattr(Path, "write_text", crash)
    with pytest.raises(OSError, match="No space left"):
        to_jsonl.convert("charades_sta", root, out, ["train"], QuirkPolicy())
    assert list(out.iterdir()) == []


def test_a_duration_csv_that_is_not_utf8_is_one_line(tmp_path, capsys):
    """Before: a UnicodeDecodeError traceback."""
    root = charades_root(tmp_path / "charades")
    with open(root / "Charades_v1_train.csv", "ab") as csv_file:
        csv_file.write(b"\xff\xfe\n")
    assert to_jsonl.main(["charades_sta", str(root), str(tmp_path / "out")]) == 2
    where = f"{root / 'Charades_v1_train.csv'}:4"
    assert (
        capsys.readouterr().err
        == f"error: {where}: malformed annotation: not UTF-8 (byte 0xff at column 1)\n"
    )


def test_converter_into_a_folder_one_may_not_write_in_is_one_line(tmp_path, unwritable_folder, capsys):
    """Before: a PermissionError traceback."""
    out = unwritable_folder / "out"
    assert to_jsonl.main(["charades_sta", str(charades_root(tmp_path / "charades")), str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and str(unwritable_folder) in error and "\n" not in error
