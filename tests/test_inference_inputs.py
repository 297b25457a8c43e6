"""Inputs of the inference API and the predict CLI that once gave tracebacks or were misread."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.inference_runs import (
    VIDEOS,
    damaged_copy,
    truncated_copy,
    write_moment_video,
    write_timed_video,
)
from timerefine.inference import grounder as grounder_module
from timerefine.inference.grounder import Features, Grounder
from timerefine.inference.run_loading import predict
from timerefine.inference.video_features import EncoderSpec, InputError
from timerefine.tools.export import main as export_main
from timerefine.tools.predict import main as predict_main

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # the session's tiny video run (trained once, ~15 s)


@pytest.mark.parametrize(
    ("text", "reason"),
    [("{bad", "not JSON"), (json.dumps({"model": "clip", "fp16": False}), "not an encoder record")],
)
def test_a_damaged_encoder_record_is_one_line_naming_it(tmp_path, text, reason):
    """Before: JSONDecodeError or KeyError tracebacks from predict on a video."""
    record = tmp_path / "encoder.json"
    record.write_text(text)
    with pytest.raises(InputError, match=f"^{re.escape(str(record))}: {reason}"):
        EncoderSpec.read(record)


def test_the_api_refuses_a_query_that_is_not_text(video_run):
    """Before: AttributeError from the query normaliser."""
    grounder = Grounder.from_run(video_run.run_dir)
    features = np.zeros((16, 16), dtype=np.float32)
    with pytest.raises(InputError, match=r"^query 2: must be text, got None$"):
        grounder.ground(features, ["a red square appears", None], duration=20.0)


@pytest.mark.parametrize(
    ("queries", "batch_size", "message"),
    [
        (b"a red square", 1, "queries: give a text or texts, got bytes (decode them first)"),
        ("a red square", 1.5, "batch_size=1.5: must be a whole number >= 1"),
        ("a red square", True, "batch_size=True: must be a whole number >= 1"),
    ],
)
def test_the_api_names_a_mistaken_argument(video_run, queries, batch_size, message):
    """Before (review): bytes were read as queries of ints ('query 1: must be text, got 97') and a
    float batch_size was a TypeError from range()."""
    grounder = Grounder.from_run(video_run.run_dir)
    with pytest.raises(InputError, match=f"^{re.escape(message)}$"):
        grounder.ground(np.zeros((16, 16), dtype=np.float32), queries, duration=20.0, batch_size=batch_size)


def test_answers_hold_plain_floats_and_one_override_may_be_a_text(video_run):
    """Before (review): a numpy duration stayed numpy in the answer (as_json() was no JSON), and an
    override given as a text was read letter by letter ('m: answering can set only ...')."""
    grounder = Grounder.from_run(video_run.run_dir, overrides="model.inference.final=aux")
    features = Features(np.zeros((16, 16), dtype=np.float32), np.float32(20.0))
    [answer] = grounder.ground(features, "a red square appears")
    assert type(answer.duration) is float and type(answer.start) is float
    json.dumps(answer.as_json())
    assert grounder.run.cfg.model.inference.final == "aux"


def test_an_export_without_an_encoder_names_its_record(video_run, tmp_path):
    """Before (review): it named the run's features' encoder.json as missing, which was there: an
    export takes its encoder from export.json alone (none recorded where the features were not found)."""
    export = tmp_path / "export"
    assert export_main([str(video_run.run_dir), str(export)]) == 0
    manifest = json.loads((export / "export.json").read_text())
    (export / "export.json").write_text(json.dumps({**manifest, "encoder": None}))
    message = (
        f"the run records no video encoder ({export / 'export.json'} records none: not found when exported"
    )
    with pytest.raises(InputError, match=f"^{re.escape(message)}"):
        Grounder.from_export(export).features(video_run.videos / "vid_red_a.mp4")


def test_an_mp4_cut_before_its_index_is_named_truncated(video_run, tmp_path):
    """Before (review): 'has no video stream', where the docs promise a truncated video is named so."""
    cut = truncated_copy(video_run.videos / "vid_red_a.mp4", tmp_path / "cut.mp4", keep=2 / 3)
    with pytest.raises(
        InputError, match=f"^{re.escape(str(cut))}: has no video stream .truncated or damaged"
    ):
        Grounder.from_run(video_run.run_dir).features(cut)


def test_the_api_refuses_a_query_spelling_a_special_token(video_run):
    """Before: ``</s>`` in a query was encoded as the tokenizer's end-of-text token, not as text."""
    grounder = Grounder.from_run(video_run.run_dir)
    features = np.zeros((16, 16), dtype=np.float32)
    with pytest.raises(InputError, match=r"^query 1: the query holds '</s>', which the tokenizer reads"):
        grounder.ground(features, "a red </S> square", duration=20.0)


def test_the_api_checks_the_device_whichever_way_it_loads(video_run):
    """Before: only ``Grounder.load`` checked it; ``from_run`` failed inside torch. Its message named
    the command line's flag, ``--device``, which a Python caller has not."""
    with pytest.raises(InputError, match=r"^device cuda:7: no such CUDA device"):
        Grounder.from_run(video_run.run_dir, device="cuda:7")


def test_upper_case_suffixes_are_read_as_their_kind(video_run, tmp_path, capsys):
    """Before: ``A.NPY`` was unpickled as a ``.pt`` file, and ``PAIRS.JSONL`` taken for a video."""
    features = tmp_path / "A.NPY"
    shutil.copy(video_run.features / "vid_red_a.npy", features)
    run = ["--run", str(video_run.run_dir), "--json"]
    assert predict_main([str(features), *run, "--query", "a red square appears", "--duration", "4"]) == 0
    (single,) = json.loads(capsys.readouterr().out)
    pairs = tmp_path / "PAIRS.JSONL"
    pairs.write_text(json.dumps({"video": "A.NPY", "query": "a red square appears", "duration": 4}) + "\n")
    assert predict_main([str(pairs), *run]) == 0
    assert json.loads(capsys.readouterr().out) == [single]


def test_a_recorded_encoder_that_cannot_load_is_named_by_its_record(video_run, tmp_path):
    """Before: ``--encoder <model>: cannot load it``, naming a flag the user never gave."""
    from omegaconf import OmegaConf

    features, run_dir = tmp_path / "features", tmp_path / "run"
    shutil.copytree(video_run.features, features)
    shutil.copytree(video_run.run_dir, run_dir)
    record = json.loads((features / "encoder.json").read_text()) | {"model": str(tmp_path / "moved_clip")}
    (features / "encoder.json").write_text(json.dumps(record))
    config = OmegaConf.load(run_dir / "config.yaml")
    config.data.source.feature_path = str(features)
    OmegaConf.save(config, run_dir / "config.yaml")
    grounder = Grounder.from_run(run_dir)
    expected = f"{features / 'encoder.json'}: model {tmp_path / 'moved_clip'}: not a local folder"
    with pytest.raises(InputError, match=f"^{re.escape(expected)}"):
        grounder.ground(video_run.videos / "vid_red_a.mp4", "a red square appears")


def test_features_hold_their_duration_and_the_runs_shape(video_run):
    """Before: a duration given besides them was ignored, a negative one gave negative seconds, and a
    transposed array a RuntimeError deep in the model."""
    grounder = Grounder.from_run(video_run.run_dir)
    features = grounder.features(video_run.features / "vid_red_a.npy", duration=4.0)
    query = "a red square appears"
    with pytest.raises(InputError, match=r"^duration=30: a Features object holds its duration \(4 s\)"):
        grounder.ground(features, query, duration=30)
    for duration in (-4.0, 0, float("nan"), float("inf"), "4"):
        with pytest.raises(InputError, match=r"^Features duration=.*: must be a positive number of seconds$"):
            Features(features.array, duration)
    for shape in [(16, 32), (8, 16), (16,)]:
        with pytest.raises(
            InputError,
            match=rf"^the Features array has shape {re.escape(str(shape))}, the run reads \(16, 16\)",
        ):
            grounder.ground(Features(np.zeros(shape, np.float32), 4.0), query)
    nan = Features(np.full((16, 16), np.nan, np.float32), 4.0)
    with pytest.raises(InputError, match=r"^the Features array: non-finite: 256 NaN/inf values"):
        grounder.ground(nan, query)
    assert grounder.ground(Features(features.array.astype(np.float64), 4.0), query) == grounder.ground(
        features, query
    )
    # before (review): numpy's scalars (a duration read from an array or a table) were refused
    for duration in (np.float32(4.0), np.int64(4)):
        assert grounder.ground(features.array, query, duration=duration) == grounder.ground(features, query)
    with pytest.raises(InputError, match=r"^duration '4': must be a positive number of seconds$"):
        grounder.ground(features.array, query, duration="4")
    (answer,) = grounder.ground(video_run.videos / "vid_red_a.mp4", query, duration=np.float32(4.0))
    assert type(answer.duration) is float and json.dumps(answer.as_json())  # before: np.float32 leaked in
    with pytest.raises(InputError, match=r"^duration 1000000000.*: must be a positive number of seconds$"):
        grounder.ground(features.array, query, duration=10**400)  # before: OverflowError


def test_complex_features_are_refused_as_a_file_and_as_a_tensor(video_run, tmp_path):
    """Before: their imaginary part was dropped with a warning (cast to float), and they got an answer."""
    import torch

    grounder = Grounder.from_run(video_run.run_dir)
    imaginary = tmp_path / "imaginary.npy"
    np.save(imaginary, np.full((16, 16), 1j, np.complex64))
    tensor = torch.full((16, 16), 1j)
    for video, name in [(imaginary, str(imaginary)), (tensor, "the feature array")]:
        with pytest.raises(InputError, match=f"^{re.escape(name)}: bad shape: dtype complex64 is not real"):
            grounder.ground(video, "a red square appears", duration=4.0)


@pytest.mark.parametrize(
    ("arrays", "reason"),
    [  # before: answered start=end=0 with "aux": [NaN, NaN], exit 0
        (
            {"features": np.full((8, 16), 1e39)},
            "non-finite: 128 NaN/inf values, 128 of them beyond float32's",
        ),
        # before: answered on the first array (clip)
        (
            {"clip": np.zeros((8, 16)), "slowfast": np.ones((8, 16))},
            "unreadable feature file (ValueError: several arrays (clip, slowfast) and none named features)",
        ),
    ],
)
def test_features_are_read_as_the_model_reads_them(video_run, tmp_path, capsys, arrays, reason):
    features = tmp_path / "features.npz"
    np.savez(features, **arrays)
    argv = [str(features), "--run", str(video_run.run_dir), "--duration", "3", "--query", "a red square"]
    assert predict_main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(f"error: {features}: {reason}"), captured.err
    assert len(captured.err.splitlines()) == 1


def test_encoder_options_apply_to_the_recorded_encoder_or_are_refused(video_run, capsys, monkeypatch):
    """Before: without --encoder, --fp16 and --no-projection were silently ignored (the recorded encoder
    was used as recorded), and with feature files every encoder flag was."""
    from timerefine.inference import grounder as grounder_module

    made = []
    real = grounder_module.ClipFrameEncoder
    monkeypatch.setattr(grounder_module, "ClipFrameEncoder", lambda *args: made.append(args) or real(*args))
    run, video = ["--run", str(video_run.run_dir), "--query", "a red square appears"], video_run.videos
    assert predict_main([str(video / "vid_red_a.mp4"), *run, "--fp16", "--json"]) == 0
    assert [(model, fp16) for model, _, _, fp16 in made] == [(str(video_run.encoder), True)]
    assert len(json.loads(capsys.readouterr().out)) == 1
    record = video_run.features / "encoder.json"
    refused = {
        "--no-projection": f"--no-projection: {record}: model {video_run.encoder} keeps its projection",
        "--fp16": "--fp16: the input is features, no video is encoded",
    }
    inputs = {"--no-projection": video / "vid_red_a.mp4", "--fp16": video_run.features / "vid_red_a.npy"}
    for flag, message in refused.items():
        assert predict_main([str(inputs[flag]), *run, "--duration", "4", flag]) == 2
        captured = capsys.readouterr()
        (line,) = captured.err.strip().splitlines()
        assert captured.out == "" and line.startswith(f"error: {message}"), line


@pytest.mark.parametrize("kind", ["damaged", "variable"])
def test_a_video_with_frames_missing_mid_stream_is_refused(video_run, tmp_path, capsys, kind):
    """Before: exit 0, answered on frames sampled by index as if evenly spread over the length: 2.3 s
    then 5.7 s for a file damaged in the middle, 13 of 16 frames in the first 2 s of 9.3 s for one of
    a variable frame rate."""
    if kind == "damaged":
        whole = write_moment_video(tmp_path / "whole.mkv", 10.0, "red", 2.0, 4.0)
        video = damaged_copy(whole, tmp_path / "damaged.mkv")
    else:
        times = [i / 40 for i in range(80)] + [2 + i * 0.38 for i in range(20)]
        video = write_timed_video(tmp_path / "variable.mkv", times)
    assert predict_main([str(video), "--run", str(video_run.run_dir), "--query", "a red square"]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert captured.out == "" and line.startswith(f"error: {video}: frames missing "), line
    assert line.endswith(": damaged, or a variable frame rate): the answer's times would be wrong"), line


def test_a_pairs_file_batches_queries_across_videos(video_run, tmp_path, capsys, monkeypatch):
    """Before: predict decoded each video's queries on their own, so a pairs file of one query per video
    ran batches of 1, whatever --batch-size said. The answers are those of one query at a time."""
    grounder = Grounder.from_run(video_run.run_dir)
    rows = [
        {
            "video": str(video_run.features / f"{name}.npy"),
            "query": f"a {colour} square appears",
            "duration": seconds,
        }
        for name, seconds, colour, *_ in VIDEOS
    ]
    alone = [grounder.ground(row["video"], [row["query"]], row["duration"])[0].text for row in rows]
    pairs = [(grounder.features(row["video"], row["duration"]), row["query"]) for row in rows]
    assert [answer.text for answer in grounder.ground_pairs(pairs, batch_size=4)] == alone
    decoded = []
    monkeypatch.setattr(
        grounder_module, "predict", lambda run, f, q: decoded.append(len(q)) or predict(run, f, q)
    )
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert (
        predict_main([str(pairs_file), "--run", str(video_run.run_dir), "--json", "--batch-size", "4"]) == 0
    )
    assert decoded == [4, 2]
    assert [answer["text"] for answer in json.loads(capsys.readouterr().out)] == alone


@pytest.mark.parametrize("video", ["", "folder"])
def test_a_pairs_video_that_is_empty_or_a_folder_is_named_by_its_line(video_run, tmp_path, capsys, video):
    """Before (review): "error: <the .jsonl's folder>: a folder, not a file", without the line."""
    (tmp_path / "folder").mkdir()
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"video": video, "query": "a red square", "duration": 3}) + "\n")
    assert predict_main([str(pairs), "--run", str(video_run.run_dir)]) == 2
    found = tmp_path / video if video else tmp_path
    expected = f'error: {pairs}:1: "video" {video!r}: {found}: a folder, not a file'
    assert capsys.readouterr().err.strip() == expected


def test_a_pairs_file_refuses_an_unreadable_video_before_encoding_any(
    video_run, tmp_path, capsys, monkeypatch
):
    """Before (review): the videos before it were encoded and answered, then all was lost to one error
    naming the video, not its line."""
    cut = truncated_copy(video_run.videos / "vid_red_a.mp4", tmp_path / "cut.mp4", keep=1 / 2)
    lines = [
        {"video": str(video_run.videos / "vid_blue_a.mp4"), "query": "a"},
        {"video": str(cut), "query": "b"},
    ]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    encoded, encode = [], grounder_module.encode_video
    monkeypatch.setattr(
        grounder_module, "encode_video", lambda *args: encoded.append(args[0]) or encode(*args)
    )
    assert predict_main([str(pairs), "--run", str(video_run.run_dir)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {pairs}:2: {cut}: ")
    assert encoded == []


@pytest.mark.parametrize("reader", ["closed pipe", "full disk"])
def test_answers_that_cannot_be_written_end_without_a_traceback(video_run, reader):
    """Before (review): a BrokenPipeError traceback under ``| head`` and an OSError one on a full disk."""
    features = next(video_run.features.glob("*.npy"))
    command = [sys.executable, "predict.py", str(features), "--run", str(video_run.run_dir), "--json"]
    command += ["--duration", "20", "--query", "a red square"]
    if reader == "full disk":
        with open("/dev/full", "w") as full:
            done = subprocess.run(command, cwd=ROOT, stdout=full, stderr=subprocess.PIPE, text=True)
        assert (done.returncode, done.stderr.splitlines()[-1]) == (
            1,
            "error: writing the answers to stdout: [Errno 28] No space left on device",
        )
        return
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # the reader is gone before the answers come
    assert process.wait(timeout=300) == 1
    assert "Traceback" not in process.stderr.read()


def test_a_json_input_is_told_that_pairs_are_jsonl(video_run, tmp_path, capsys):
    """Before (review): read as a video, 'pairs.json: not a readable video (InvalidDataError ...)'."""
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([{"video": "a.mp4", "query": "q"}]))
    assert predict_main([str(pairs), "--run", str(video_run.run_dir)]) == 2
    assert (
        capsys.readouterr().err
        == f'error: {pairs}: a pairs file is .jsonl, one {{"video", "query"}} object per line\n'
    )
