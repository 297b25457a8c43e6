"""Grounding queries in real video files: the Grounder API and the predict CLI, with their one-line errors."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
from transformers import CLIPVisionConfig, CLIPVisionModel

from tests import launched
from tests.inference_runs import (
    VIDEOS,
    truncated_copy,
    write_audio_only,
    write_moment_video,
    write_still,
)
from timerefine.inference.grounder import Grounder
from timerefine.inference.video_features import InputError
from timerefine.tools.predict import main

pytestmark = pytest.mark.slow  # each test needs the session's tiny video run (trained once, ~15 s)
QUERIES = ["a red square appears", "a blue square appears"]
STEPS = 5  # the first coarse segment and K=3 refinements of it, then the final one: refine.steps + 2
LONG_QUERY = "a red square appears in the middle " * 150  # over 512 positions in any tokenizer


@pytest.fixture(scope="module")
def grounder(video_run) -> Grounder:
    return Grounder.from_run(video_run.run_dir)


def test_predict_json_on_a_real_video(video_run, grounder):
    video = video_run.videos / "vid_red_a.mp4"
    command = ["-m", "timerefine.tools.predict", str(video), "--run", str(video_run.run_dir)]
    result = launched.run([*command, "--query", QUERIES[0], "--query", QUERIES[1], "--json"], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads(result.stdout)
    assert [a["query"] for a in answers] == QUERIES
    for answer in answers:
        assert {"query", "start", "end", "steps", "aux", "text"} <= set(answer)
        assert answer["duration"] == 4.0 and len(answer["steps"]) == STEPS
        assert [answer["start"], answer["end"]] == answer["steps"][-1]  # model.inference.final=last
        assert all(0 <= s <= e <= 4.0 for s, e in answer["steps"])
        assert answer["aux"] is not None and answer["text"].startswith("From <SEG_START>")
    # The CLI and the Python API agree to the printed precision.
    expected = [a.as_json() for a in grounder.ground(video, QUERIES)]
    assert [{k: a[k] for k in expected[0]} for a in answers] == expected


def test_a_video_gives_the_features_extraction_gave_training(video_run, grounder):
    """Decoding + encoding a video at predict time reproduces the extracted feature file exactly."""
    video, features = video_run.videos / "vid_green_b.mp4", video_run.features / "vid_green_b.npy"
    from_video = grounder.features(video)
    from_file = grounder.features(features, duration=5.0)
    np.testing.assert_array_equal(from_video.array, from_file.array)
    assert from_video.duration == pytest.approx(5.0)
    assert grounder.ground(from_video, QUERIES) == grounder.ground(features, QUERIES, duration=5.0)


def test_queries_are_batched(video_run, grounder):
    queries = ["a green square appears", "red", "a blue square shows up in the middle of the video"]
    video = grounder.features(video_run.videos / "vid_blue_a.mp4")
    one_by_one = [grounder.ground(video, [query])[0] for query in queries]
    batched = grounder.ground(video, queries, batch_size=2)  # left-padded prompts of different lengths
    assert [(a.query, a.text, a.steps) for a in batched] == [(a.query, a.text, a.steps) for a in one_by_one]
    for together, alone in zip(batched, one_by_one, strict=True):  # padding moves floats by rounding only
        assert together.aux == pytest.approx(alone.aux, abs=1e-5)
    array = grounder.ground(video.array, queries, duration=video.duration)  # a (T, D) array
    assert [a.text for a in array] == [a.text for a in one_by_one]


def test_jsonl_pairs_and_table(video_run, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    rows = [
        {"video": str(video_run.videos / "vid_red_b.mp4"), "query": QUERIES[0]},
        {"video": str(video_run.features / "vid_blue_b.npy"), "query": QUERIES[1], "duration": 5.0},
        {"video": str(video_run.videos / "vid_red_b.mp4"), "query": QUERIES[1]},
    ]
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main([str(pairs), "--run", str(video_run.run_dir), "--json"]) == 0
    captured = capsys.readouterr()
    answers = json.loads(captured.out)
    assert [(a["video"], a["query"]) for a in answers] == [(r["video"], r["query"]) for r in rows]
    assert [a["duration"] for a in answers] == [5.0, 5.0, 5.0]
    assert "grounding videos" in captured.err and "2/2" in captured.err  # before: no progress shown
    video = video_run.videos / "vid_red_b.mp4"
    assert main([str(video), "--run", str(video_run.run_dir), "--query", QUERIES[0]]) == 0
    captured = capsys.readouterr()
    assert "vid_red_b.mp4" in captured.out and "a red square" in captured.out and "->" in captured.out
    assert "grounding videos" not in captured.err  # one video: no bar


def pairs_file(path: Path, *rows: dict) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_frameless(path: Path) -> Path:
    """A Matroska file whose video stream holds no frame (a sound track keeps the file valid)."""
    with av.open(str(path), "w") as container:
        video = container.add_stream("mpeg4", rate=10)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*audio.encode(frame), *audio.encode(), *video.encode()]:
            container.mux(packet)
    return path


@pytest.fixture
def bad_inputs(video_run, builtin_run, tmp_path) -> dict[str, tuple[list[str], str]]:
    """Each bad input: the CLI arguments and what its one error line must say."""
    run, red = str(video_run.run_dir), str(video_run.videos / "vid_red_a.mp4")
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    audio = write_audio_only(tmp_path / "audio.mp4")
    frameless = write_frameless(tmp_path / "frameless.mkv")
    wide = tmp_path / "wide.npy"
    np.save(wide, np.zeros((8, 32), np.float32))
    still = write_still(tmp_path / "still.png")
    pickled = tmp_path / "pickled.pt"  # a pickle that torch.load(weights_only=True) refuses, in ten lines
    pickled.write_bytes(pickle.dumps(print))
    no_ckpt = tmp_path / "no_ckpt"
    shutil.copytree(video_run.run_dir, no_ckpt, ignore=shutil.ignore_patterns("checkpoints"))
    pooled = tmp_path / "pooled_clip"
    CLIPVisionModel(CLIPVisionConfig.from_pretrained(video_run.encoder)).save_pretrained(pooled)
    six = write_moment_video(tmp_path / "six.mp4", 6.0, "red", 2.0, 4.0)
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(
        json.dumps({"video": red, "query": "a red square"}).encode()
        + b"\n"
        + b'{"video": "vid_red_a.mp4", "query": "a red caf\xe9"}\n'
    )
    ten = pairs_file(tmp_path / "ten.jsonl", {"video": red, "query": "a red square", "duration": "ten"})
    nameless = pairs_file(tmp_path / "nameless.jsonl", {"video": red, "query": " . "})
    longer = pairs_file(tmp_path / "longer.jsonl", {"video": str(six), "query": "red", "duration": 100})
    long_pairs = pairs_file(tmp_path / "long.jsonl", {"video": red, "query": LONG_QUERY})
    timeless = pairs_file(tmp_path / "timeless.jsonl", {"video": str(wide), "query": "a red square"})
    misspelt = pairs_file(
        tmp_path / "misspelt.jsonl", {"video": red, "query": "a red square", "durattion": 6}
    )
    query = ["--query", "a red square appears"]
    return {
        # before: a RuntimeError traceback, exit 1
        "not a device": ([red, "--run", run, *query, "--device", "foo"], "--device foo: not a device"),
        "no CUDA here": (
            [red, "--run", run, *query, "--device", "cuda:7"],
            "--device cuda:7: no such CUDA device",
        ),
        # before: the advice to pass --duration, which a .jsonl input then ignored
        "features without duration in a pairs file": (
            [str(timeless), "--run", run],
            f'{timeless}:1: "duration" is needed with a feature file',
        ),
        "--duration with a pairs file": (
            [str(ten), "--run", run, "--duration", "9"],
            "--duration: a .jsonl input holds each line's query and duration itself",
        ),
        "missing video": (
            [str(tmp_path / "nope.mp4"), "--run", run, *query],
            f"{tmp_path / 'nope.mp4'}: no such file",
        ),
        "unreadable video": ([str(garbage), "--run", run, *query], f"{garbage}: not a readable video"),
        "no video stream": ([str(audio), "--run", run, *query], f"{audio}: has no video stream"),
        "no frame": ([str(frameless), "--run", run, *query], f"{frameless}: the video stream holds no frame"),
        # before: answered over a video of 0.04 s, exit 0
        "still image": (
            [str(still), "--run", run, *query],
            f"{still}: a single frame (a still image?), not a",
        ),
        "empty query": (
            [red, "--run", run, "--query", "a", "--query", "  "],
            "--query 2: the query is empty",
        ),
        "no query": ([red, "--run", run], "--query: give at least one query"),
        "wrong feature size": (
            [str(wide), "--run", run, "--duration", "3", *query],
            f"{wide}: bad shape: expected (T, 16), got (8, 32)",
        ),
        "unreadable .pt features": (
            [str(pickled), "--run", run, "--duration", "3", *query],
            f"{pickled}: unreadable feature file (UnpicklingError: Weights only load failed.",
        ),
        "features without duration": (
            [str(wide), "--run", run, *query],
            "--duration: needed with a feature file, which holds no time",  # review: named "duration:"
        ),
        "no checkpoint": (
            [red, "--run", str(no_ckpt), *query],
            f"no checkpoint in {no_ckpt / 'checkpoints'}",
        ),
        "not a run": ([red, "--run", str(tmp_path), *query], f"{tmp_path}: no config.yaml"),
        "no encoder recorded": ([red, "--run", str(builtin_run), *query], "the run records no video encoder"),
        "encoder not found": (
            [red, "--run", run, "--encoder", str(tmp_path / "nope"), *query],
            f"--encoder {tmp_path / 'nope'}: not a local folder, and not a Hugging Face name",
        ),
        "encoder of another size": (
            [red, "--run", run, "--encoder", str(pooled), "--no-projection", *query],
            f"--encoder {pooled}: makes 32-d features, the run reads 16-d",
        ),
        "non-UTF-8 pairs file": ([str(latin1), "--run", run], f"{latin1}:2: not UTF-8 (byte 0xe9"),
        "duration not a number": (
            [str(ten), "--run", run],
            f"{ten}:1: \"duration\" must be a positive number of seconds, got 'ten'",
        ),
        "empty query in a pairs file": ([str(nameless), "--run", run], f"{nameless}:1: the query is empty"),
        "duration of another video": (
            [str(six), "--run", run, "--duration", "100", *query],
            f"duration 100: {six} lasts 6.00 s",
        ),
        # before: named --duration, which was not given, and not the line
        "duration of another video in a pairs file": (
            [str(longer), "--run", run],
            f'{longer}:1: "duration" 100: {six} lasts 6.00 s (leave "duration" out to use the video\'s own)',
        ),
        "query too long": (
            [red, "--run", run, *query, "--query", LONG_QUERY],
            "--query 2: the query is ",
        ),
        "query too long in a pairs file": ([str(long_pairs), "--run", run], f"{long_pairs}:1: the query is "),
        # before: a ValueError traceback blaming the prompt template
        "<video> in a query": (
            [red, "--run", run, "--query", "a <Video> of it"],
            "--query 1: the query holds <video>",
        ),
        # before: answered on the video's own length, the misspelt key unread
        "unknown key in a pairs file": (
            [str(misspelt), "--run", run],
            f'{misspelt}:1: "durattion" is not a key of a pair (video, query, duration)',
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing video",
        "unreadable video",
        "no video stream",
        "no frame",
        "still image",
        "empty query",
        "no query",
        "wrong feature size",
        "unreadable .pt features",
        "features without duration",
        "no checkpoint",
        "not a run",
        "no encoder recorded",
        "encoder not found",
        "encoder of another size",
        "non-UTF-8 pairs file",
        "duration not a number",
        "empty query in a pairs file",
        "duration of another video",
        "duration of another video in a pairs file",
        "query too long",
        "query too long in a pairs file",
        "<video> in a query",
        "not a device",
        "no CUDA here",
        "features without duration in a pairs file",
        "--duration with a pairs file",
        "unknown key in a pairs file",
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(bad_inputs, case, capsys):
    argv, message = bad_inputs[case]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1, captured.err
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]


def test_a_longer_video_of_another_size(video_run, grounder, tmp_path):
    """Any resolution and length: frames are sampled uniformly and centre-cropped as in extraction."""
    video = write_moment_video(tmp_path / "long.mp4", 9.0, "green", 4.0, 6.0, fps=7)
    (answer,) = grounder.ground(video, "a green square appears")
    assert answer.duration == pytest.approx(9.0, abs=0.2) and len(answer.steps) == STEPS
    assert re.fullmatch(r"From <SEG_START> .* <SEG_END>\.", answer.text)
    assert VIDEOS  # the run never saw this video


@pytest.mark.parametrize(
    ("argument", "value", "message"),
    [
        ("--batch-size", "0", "must be an integer >= 1, got '0'"),
        ("--batch-size", "-3", "must be an integer >= 1, got '-3'"),
        ("--duration", "-5", "must be a positive number of seconds, got '-5'"),
        ("--duration", "0", "must be a positive number of seconds, got '0'"),
        ("--duration", "nan", "must be a positive number of seconds, got 'nan'"),
        ("--duration", "inf", "must be a positive number of seconds, got 'inf'"),
    ],
)
def test_bad_numbers_are_refused_by_the_parser(video_run, argument, value, message, capsys):
    video = str(video_run.videos / "vid_red_a.mp4")
    with pytest.raises(SystemExit) as exit_:
        main([video, "--run", str(video_run.run_dir), "--query", "a red square", argument, value])
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().splitlines()[-1].endswith(f"error: argument {argument}: {message}")


def test_a_given_duration_must_be_the_videos_own(video_run, grounder, tmp_path, capsys):
    """Close to the video's length (an annotation's rounding) it is used; far from it, it is refused."""
    six = write_moment_video(tmp_path / "six.mp4", 6.0, "red", 2.0, 4.0)
    assert (
        main([str(six), "--run", str(video_run.run_dir), "--query", "red", "--duration", "6.2", "--json"])
        == 0
    )
    assert json.loads(capsys.readouterr().out)[0]["duration"] == 6.2
    for duration in (3.0, 100.0, -5.0, float("nan")):
        with pytest.raises(InputError, match=r"^duration "):
            grounder.features(six, duration)


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_a_truncated_video_is_refused(video_run, grounder, tmp_path, suffix, capsys):
    """An MP4 whose index promises 100 frames, and a Matroska file whose header promises 10 s,
    cut short: the answer would be about the part that decodes, stretched over the whole length."""
    whole = write_moment_video(tmp_path / f"whole{suffix}", 10.0, "red", 2.0, 4.0, faststart=suffix == ".mp4")
    cut = truncated_copy(whole, tmp_path / f"cut{suffix}", keep=0.5)
    assert grounder.features(whole).duration == pytest.approx(10.0)  # the same file, whole, is fine
    assert main([str(cut), "--run", str(video_run.run_dir), "--query", "a red square"]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert captured.out == "" and line.startswith(f"error: {cut}: only "), line
    decoded = re.search(
        r"only (\d+)% of the video decodes \((\d+) of (\d+) frames, up to ([\d.]+) s of 10.00 s\)", line
    )
    assert decoded, line
    share, frames, promised, end = int(decoded[1]), int(decoded[2]), int(decoded[3]), float(decoded[4])
    assert 10 <= share <= 90 and share == round(100 * end / 10.0) and frames <= promised
    assert line.endswith("the file is truncated or damaged")


def test_without_its_encoder_record_a_run_names_the_record(grounder, video_run):
    """Before: "its features were not made by timerefine-extract-features", also when their folder
    (and encoder.json in it) had moved."""
    record = Path(grounder.run.cfg.data.source.feature_path) / "encoder.json"
    with pytest.raises(
        InputError, match=f"the run records no video encoder .no {re.escape(str(record))}: moved"
    ):
        Grounder(grounder.run).features(video_run.videos / "vid_red_a.mp4")


def test_a_query_longer_than_the_language_model_is_refused(video_run, grounder):
    """Past its positions the LM reads nonsense (RoPE extrapolates without an error): say so instead."""
    video = grounder.features(video_run.videos / "vid_red_a.mp4")
    limit = grounder.run.language_model.config.max_position_embeddings
    with pytest.raises(
        InputError,
        match=rf"^query 2: the query is [\d,]+ tokens long; this model takes at most \d+ \(its language model has {limit} positions",
    ):
        grounder.ground(video, ["a red square", LONG_QUERY])


def test_the_api_answers_in_seconds_as_the_run_scored_them(tmp_path):
    """A run on VTimeLLM's timeline (index / 100, not / 99) and unclipped segments: the API turned
    its indices into seconds on the default timeline, so every answer was off by up to 1 %."""
    from timerefine import train
    from timerefine.inference.run_loading import dataset_examples

    run_dir = tmp_path / "run"
    overrides = [
        "experiment=tiny",
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
        "data.timeline=vtimellm100",
    ]
    assert train.main([*overrides, "model.inference.order_and_clip=false", f"output_dir={run_dir}"]) == 0
    rows = [json.loads(line) for line in (run_dir / "predictions" / "test.jsonl").read_text().splitlines()]
    grounder = Grounder.from_run(run_dir)
    for row, (record, store) in zip(rows, dataset_examples(grounder.run.cfg), strict=True):
        answer = grounder.ground(store.load(record.video_id), record.query, duration=record.duration)[0]
        assert row["qid"] == record.qid and answer.text == row["text"]
        assert [answer.start, answer.end] == pytest.approx(row["pred"], abs=1e-9)
        assert [x for step in answer.steps for x in step] == pytest.approx(
            [x for step in row["steps"] for x in step], abs=1e-9
        )
