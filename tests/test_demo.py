"""The web demo: its timeline (pure), its answers and messages, and the page in a real headless browser."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import av
import pytest

from tests.demo_browser import ask, browser_available, chromium, free_port
from tests.inference_runs import VIDEOS, write_moment_video
from timerefine.demo.app import Demo, build_app, demo_examples, launch, main, unique
from timerefine.demo.timeline_plot import Row, rows_of, timeline_svg
from timerefine.inference.grounder import Grounder, Grounding

ANSWER = Grounding("q", 2.0, 3.0, [(1.0, 4.0), (1.5, 3.5), (2.0, 3.0)], (1.9, 3.1), "From ...", 10.0)


def test_rows_hold_truth_every_step_aux_and_answer():
    rows = rows_of(ANSWER, truth=(2.2, 3.2))
    assert [r.name for r in rows] == ["truth", "step0", "step1", "step2", "aux", "final"]
    assert [r.label for r in rows][1:4] == ["coarse (step 0)", "refined, step 1", "refined, step 2 (last)"]
    assert rows_of(ANSWER, truth=None)[0].name == "step0"
    unparsed = Grounding("q", None, None, [], None, "garbage", 10.0)
    assert rows_of(unparsed, truth=None) == []


def test_timeline_svg_places_bars_in_seconds():
    svg = timeline_svg([Row("final", "answer <b>", 2.5, 5.0, "final")], duration=10.0)
    assert 'data-row="final" data-start="2.500" data-end="5.000"' in svg
    assert 'x="300.0"' in svg and 'width="150.0"' in svg  # 150 px of labels, then 60 px a second
    assert "answer &lt;b&gt;" in svg and ">0 s<" in svg and ">10 s<" in svg


def test_a_video_of_hours_gets_hour_ticks_and_repeated_labels_stay_apart():
    """Review: past 4 h no tick step was found (StopIteration: the page showed "Error" beside the last
    answer); a query asked twice of one video with other times (ActivityNet) was one choice."""
    svg = timeline_svg([Row("final", "answer", 600.0, 900.0, "final")], duration=5 * 3600.0)
    assert ">3600 s<" in svg and ">18000 s<" in svg
    assert unique(["v: a", "v: b", "v: a", "v: a"]) == ["v: a", "v: b", "v: a (2)", "v: a (3)"]
    assert unique(["v: a (2)", "v: a", "v: a"]) == ["v: a (2)", "v: a", "v: a (3)"]  # review: two "(2)"


@pytest.fixture(scope="module")
def video_demo(video_run, tmp_path_factory) -> Demo:
    grounder = Grounder.from_run(video_run.run_dir)
    videos = sorted(video_run.videos.glob("*.mp4"))[:2]
    return Demo(grounder, demo_examples(grounder, videos), tmp_path_factory.mktemp("clips"))


@pytest.mark.slow
def test_demo_answers_a_video_file_with_frames_and_clip(video_demo, video_run):
    label = sorted(video_run.videos.glob("*.mp4"))[0].name  # vid_blue_a.mp4, a test video of the run
    assert video_demo.query_of(label) == "a blue square appears"
    status, timeline, frames, clip, features = video_demo.answer(label, None, "a blue square appears")
    assert status.startswith("**Answer:") and 'data-row="step4"' in timeline
    assert 'data-row="truth" data-start="2.000" data-end="3.500"' in timeline and "IoU" in status
    assert frames["visible"] and len(frames["value"]) == 2 and frames["value"][0][0].shape[0] == 160
    assert clip["visible"] and Path(clip["value"]).stat().st_size > 0 and not features["visible"]


@pytest.mark.slow
def test_demo_shows_features_and_truth_for_the_runs_own_test_queries(video_demo):
    examples = [label for label in video_demo.examples if ":" in label]
    assert len(examples) == len(VIDEOS)  # the run's test split, read from its config
    status, timeline, frames, clip, features = video_demo.answer(
        examples[0], None, video_demo.query_of(examples[0])
    )
    assert "ground truth" in status and "IoU" in status and 'data-row="truth"' in timeline
    assert (
        features["visible"] and features["value"].ndim == 3 and not frames["visible"] and not clip["visible"]
    )


@pytest.mark.slow
def test_another_query_about_a_test_video_shows_no_truth(video_demo, video_run):
    """Before: the truth and IoU of the video's own query, whatever was asked."""
    label = sorted(video_run.videos.glob("*.mp4"))[0].name  # its query: "a blue square appears"
    status, timeline, *_ = video_demo.answer(label, None, "a red square appears")
    assert (
        status.startswith("**Answer:") and "ground truth" not in status and 'data-row="truth"' not in timeline
    )
    status, timeline, *_ = video_demo.answer(label, None, "  A blue square appears ")  # the same query
    assert "ground truth" in status and 'data-row="truth"' in timeline


@pytest.mark.slow
def test_two_videos_of_one_name_stay_two_choices(video_run, tmp_path):
    """Before: examples were keyed by file name, so the second ``clip.mp4`` replaced the first."""
    grounder = Grounder.from_run(video_run.run_dir)
    first, second = tmp_path / "a" / "clip.mp4", tmp_path / "b" / "clip.mp4"
    for copy in (first, second):
        copy.parent.mkdir()
        shutil.copy(sorted(video_run.videos.glob("*.mp4"))[0], copy)
    examples = demo_examples(grounder, [first, second, video_run.videos / "vid_red_a.mp4"])
    demo = Demo(grounder, examples, tmp_path)
    assert [label for label in demo.examples if ":" not in label] == [
        str(first),
        str(second),
        "vid_red_a.mp4",
    ]


@pytest.mark.slow
def test_demo_works_on_a_builtin_run_out_of_the_box(builtin_run, tmp_path):
    grounder = Grounder.from_run(builtin_run)
    demo = Demo(grounder, demo_examples(grounder, []), tmp_path)
    assert demo.examples and all(label.startswith("builtin_test_") for label in demo.examples)
    label = next(iter(demo.examples))
    _, timeline, _, _, features = demo.answer(label, None, demo.query_of(label))
    assert 'data-row="truth"' in timeline and features["visible"]


@pytest.mark.slow
def test_demo_messages_for_bad_input(video_demo, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    features = tmp_path / "features.npy"  # before: "--duration: needed with features", not a demo flag
    cases = {
        (
            None,
            str(features),
            "a red square",
        ): f"**error:** {features}: a feature file, which holds no frames",
        (None, None, "a red square"): "**error:** choose a video or upload one",
        (next(iter(video_demo.examples)), None, "  "): "**error:** type a query",
        (None, str(broken), "a red square"): f"**error:** {broken}: not a readable video",
        (
            None,
            str(tmp_path / "gone.mp4"),
            "a red square",
        ): f"**error:** {tmp_path / 'gone.mp4'}: no such file",
    }
    label = next(iter(video_demo.examples))  # before (review): the page rendered <video> as an element
    cases[(label, None, "a <video> square")] = "**error:** the query holds &lt;video&gt;"
    for arguments, message in cases.items():
        status, timeline, frames, clip, features = video_demo.answer(*arguments)
        assert status.startswith(message) and timeline == ""
        assert not (frames["visible"] or clip["visible"] or features["visible"])
    assert "&lt;/s&gt;" in video_demo.answer(label, None, "a </s> b")[0]


@pytest.mark.slow
@pytest.mark.parametrize("segment", [(3.838, 3.838), (3.82, 3.88), (1.0, 2.5), (4.0, 4.0)])
def test_the_clip_holds_a_frame_however_short_the_answer(video_demo, segment):
    """Before (review): an answer shorter than a frame interval, holding no frame, was a 0-byte clip."""
    example = next(e for e in video_demo.examples.values() if e.video is not None)
    answer = Grounding("q", *segment, [segment], None, "", 4.0)
    clip = video_demo.media(example, answer, segment)[1]["value"]
    with av.open(clip) as played:
        assert sum(1 for _ in played.decode(video=0)) >= 1


@pytest.mark.slow
def test_the_status_names_the_video_grounded_and_a_choice_clears_the_upload(video_demo, video_run):
    """Before (review): after an upload, a video chosen in the list changed only the query; the page
    went on grounding the upload, and the status did not say which video it had grounded."""
    label = "vid_blue_a.mp4"  # 4 s, offered in the list
    uploaded = str(video_run.videos / "vid_green_b.mp4")  # 5 s
    assert " s** of vid_green_b.mp4 (5.00 s)" in video_demo.answer(label, uploaded, "a blue square")[0]
    query, upload = video_demo.chosen(label)
    assert query == "a blue square appears" and upload["value"] is None
    assert " s** of vid_blue_a.mp4 (4.00 s)" in video_demo.answer(label, upload["value"], query)[0]


@pytest.mark.slow
def test_only_the_newest_clips_stay_on_disk(video_demo, monkeypatch):
    """Before (review): every answer left a clip in the demo's folder, and the folder stayed after it."""
    monkeypatch.setattr("timerefine.demo.app.CLIPS_KEPT", 1)
    label = next(lab for lab, e in video_demo.examples.items() if e.video is not None)
    descriptors = len(os.listdir("/proc/self/fd"))
    clips = [video_demo.answer(label, None, query)[3]["value"] for query in ("a red square", "a blue square")]
    assert sorted(video_demo.clip_dir.iterdir()) == [Path(clips[1])]
    assert len(os.listdir("/proc/self/fd")) == descriptors  # before (review): one left open per clip


@pytest.mark.slow
def test_the_button_and_enter_share_one_queue(video_demo):
    """Review: Gradio gave each listener a queue of its own, so Enter then Ground ran two answers at
    once, the slower one's filling the page."""
    app = build_app(video_demo.grounder, list(video_demo.examples.values()), "run")
    answers = [f for f in app.fns.values() if getattr(f.fn, "__name__", "") == "answer"]
    assert len(answers) == 2 and {f.concurrency_id for f in answers} == {"ground"}


@pytest.mark.slow
def test_sigterm_removes_the_clip_folder(builtin_run, tmp_path):
    """Before (review): the folder of answer clips was removed at a normal exit only, not at SIGTERM."""
    command = [sys.executable, "-m", "timerefine.demo.app", str(builtin_run), "--port", str(free_port())]
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, text=True, env=env, cwd=Path(__file__).parents[1]
    ) as demo:
        assert demo.stdout.readline().startswith("serving "), "the demo did not start"
        assert list(tmp_path.glob("timerefine-demo-*"))
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(timeout=60) == 143
        closing = demo.stdout.read()  # review: sys.exit left the server open, and Gradio's cache with it
    assert not list(tmp_path.glob("timerefine-demo-*")) and "closing server" in closing.lower()


@pytest.mark.slow
@pytest.mark.parametrize("taken", ["before loading", "while loading"])
def test_a_busy_port_is_one_error_line_before_serving(video_run, taken, capsys, monkeypatch):
    if taken == "while loading":  # the port is free when checked, taken by the time the demo serves
        monkeypatch.setattr("timerefine.demo.app.check_port", lambda port: None)
    with socket.socket() as busy:  # another server's port
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main([str(video_run.run_dir), "--port", str(port)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.strip().splitlines() == [
        f"error: --port {port}: 127.0.0.1:{port} is in use; choose another port"
    ]


@pytest.mark.slow
def test_a_feature_file_offered_as_a_video_is_one_error_line(video_run, capsys):
    """Before: it was offered, and every answer about it named predict's --duration."""
    features = video_run.features / "vid_red_a.npy"
    with socket.socket() as busy:  # before the fix the demo got as far as the port, and stopped there
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        assert main([str(video_run.run_dir), "--video", str(features), "--port", port]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.strip().splitlines() == [
        f"error: --video {features}: a feature file, which holds no frames to show and no length: "
        "the demo takes video files"
    ]
    assert main([str(video_run.run_dir), "--video", str(video_run.videos)]) == 2
    assert capsys.readouterr().err.strip() == f"error: --video {video_run.videos}: a folder, not a file"


@pytest.mark.slow
def test_the_encoder_of_the_videos_is_checked_before_serving(
    builtin_run, video_run, capsys, tmp_path, monkeypatch
):
    """Review: a --video of a run that records no encoder was offered, and every answer about it said
    to give an encoder, which the demo took no flag for."""
    monkeypatch.setattr("timerefine.demo.app.launch", lambda *args, **kwargs: pytest.fail("it served"))
    video, port = str(video_run.videos / "vid_red_a.mp4"), str(free_port())
    assert main([str(builtin_run), "--video", video, "--port", port]) == 2
    error = capsys.readouterr().err
    assert "error: the run records no video encoder" in error and error.strip().endswith("give --encoder")
    nowhere = tmp_path / "nope"
    assert main([str(video_run.run_dir), "--encoder", str(nowhere), "--port", port]) == 2
    assert f"error: --encoder {nowhere}: not a local folder" in capsys.readouterr().err


@pytest.mark.parametrize("port", ["0", "65536", "-1"])
def test_a_port_out_of_range_is_refused_by_the_parser(port, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["some_run", "--port", port])
    assert exit_.value.code == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .endswith(f"error: argument --port: must be a port number from 1 to 65535, got '{port}'")
    )


@pytest.mark.slow
@pytest.mark.skipif(
    not browser_available(), reason="needs Debian chromium + chromium-driver (.ci/setup_browser.sh)"
)
def test_demo_in_a_headless_browser(video_run, tmp_path):
    grounder = Grounder.from_run(video_run.run_dir)
    video = video_run.videos / "vid_red_a.mp4"
    uploaded = write_moment_video(tmp_path / "my_clip.mp4", 6.0, "green", 2.0, 4.0)
    expected = grounder.ground(video, "a red square appears")[0]
    app = build_app(grounder, demo_examples(grounder, [video]), "video run")
    port = free_port()
    launch(app, port, block=False)
    url = f"http://127.0.0.1:{port}"
    try:
        with chromium(tmp_path / "profile") as driver:
            drawn = ask(driver, url, "a red square appears")
            driver.save_screenshot(str(tmp_path / "demo.png"))
            upload = ask(driver, url, "a green square appears", upload=uploaded)
            truth = ask(driver, url, "a blue square appears", video="vid_blue_a: a blue square appears")
            chosen = ask(driver, url, "a red square appears", video="vid_red_a.mp4", upload=uploaded)
            typed = ask(
                driver, url, "a blue square appears", "vid_blue_a: a blue square appears", uploaded, True
            )
            error = ask(driver, url, " ")
    finally:
        app.close()
    # The rendered segment is the API's answer; every refinement step and the aux head are drawn.
    shown = expected.as_json()  # seconds to 3 decimals, as the bars carry them
    assert list(drawn.segments["final"]) == [shown["start"], shown["end"]]
    assert [list(drawn.segments[f"step{i}"]) for i in range(len(shown["steps"]))] == shown["steps"]
    assert list(drawn.segments["aux"]) == shown["aux"]
    assert drawn.segments["truth"] == (1.0, 2.5) and f"{expected.start:.2f}" in drawn.status
    assert drawn.frames == 2 and drawn.clip and not drawn.features
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    assert upload.segments["final"][1] <= 6.0 + 1e-3 and upload.frames == 2 and upload.clip
    assert "truth" not in upload.segments  # nothing is known about an uploaded video
    assert truth.segments["truth"] == (2.0, 3.5) and truth.features and "IoU" in truth.status
    assert (
        chosen.segments == drawn.segments and "of vid_red_a.mp4 (4.00 s)" in chosen.status
    )  # not the upload
    assert "of my_clip.mp4 (6.00 s)" in upload.status
    assert typed.suggested == "a blue square appears" and typed.segments == truth.segments  # by keyboard
    assert error.status == "error: type a query" and not error.segments
    # Nothing but the demo itself was fetched.
    hosts = {
        urlparse(u).hostname
        for r in (drawn, upload, truth, chosen, typed, error)
        for u in r.requested
        if u.startswith(("http", "ws"))
    }
    assert hosts == {"127.0.0.1"}
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)
