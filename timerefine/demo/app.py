"""A web demo of a trained run: choose or upload a video, type a query, see the refinement.

    timerefine-demo runs/x [--video clip.mp4 ...] [--port 7860]      # python demo.py runs/x

Shows a timeline with the ground truth (for the run's own test queries) and every refinement step's
segment, the frames at the answer's boundaries and the moment as a playable clip. The run's test
videos have features only (the built-in data has no pixels): for them the features are drawn over
time instead. Serves on 127.0.0.1 only, with Gradio's analytics off; the page loads nothing from
outside.
"""

from __future__ import annotations

import argparse
import atexit
import errno
import html
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import torch
from transformers.utils import logging as transformers_logging

from datamodules.quirks import QuirkError
from grounding.answer_format.prompts import normalize_query
from grounding.metrics.iou import temporal_iou
from grounding.records import FeatureError
from timerefine.demo.media import cut_clip, feature_timeline, frames_at
from timerefine.demo.timeline_plot import rows_of, timeline_svg
from timerefine.inference.encoder_flags import add_encoder_flags, use_encoder_of_flags
from timerefine.inference.grounder import Features, Grounder, Grounding
from timerefine.inference.run_loading import dataset_examples
from timerefine.inference.video_features import FEATURE_SUFFIXES, InputError, missing_file
from timerefine.pipeline.arguments import OneLineParser
from timerefine.pipeline.config import ConfigError
from timerefine.pipeline.errors import STOPPED_BY_SIGTERM

log = logging.getLogger(__name__)
DATA_ERRORS = (ConfigError, FeatureError, QuirkError, OSError, ValueError)
CSS = "#timeline svg { max-width: 100%; height: auto; }"
HOST = "127.0.0.1"  # served on the loopback interface only
CLIPS_KEPT = 16  # answer clips kept on disk while the demo runs; its folder goes when it stops


@dataclass(frozen=True)
class Example:
    """A video to choose: a file (pixels) or features only, with a query and its truth when known."""

    label: str
    query: str = ""
    video: Path | None = None
    features: Features | None = None
    truth: tuple[float, float] | None = None


def unique(labels: list[str]) -> list[str]:
    """``labels`` with a repeat numbered (``label (2)``): a query asked twice of a video, with other
    times (ActivityNet has such), stays two choices."""
    originals, used, numbered = set(labels), set(), []
    for label in labels:
        chosen, number = label, 1
        while chosen in used or (chosen != label and chosen in originals):  # a number no label has
            number += 1
            chosen = f"{label} ({number})"
        used.add(chosen)
        numbered.append(chosen)
    return numbered


def demo_examples(grounder: Grounder, videos: list[Path], count: int = 20) -> list[Example]:
    """The ``videos`` files, then the first ``count`` test queries of the run's data as features only
    (none when the data is not on this machine). A file named after a test video comes with that
    video's query and truth."""
    try:
        queries = list(dataset_examples(grounder.run.cfg))
        by_video = {record.video_id: record for record, _ in queries}
        labels = unique([f"{record.video_id}: {record.query}" for record, _ in queries[:count]])
        from_data = [
            Example(
                label,
                record.query,
                features=Features(store.load(record.video_id), record.duration),
                truth=(record.start, record.end),
            )
            for label, (record, store) in zip(labels, queries[:count], strict=True)
        ]
    except DATA_ERRORS as err:
        log.warning("no test queries of the run's data to offer (%s)", err)
        by_video, from_data = {}, []
    names = [video.name for video in videos]
    files = []
    for video in videos:
        record = by_video.get(video.stem)
        truth = None if record is None else (record.start, record.end)
        label = video.name if names.count(video.name) == 1 else str(video)  # each its own choice
        files.append(Example(label, record.query if record else "", video=video, truth=truth))
    return files + from_data


def not_a_video(path: Path) -> str | None:
    """Why the demo cannot show ``path``: a feature file (no pixels, no length); None for a video."""
    if path.suffix.lower() in FEATURE_SUFFIXES:
        return "a feature file, which holds no frames to show and no length: the demo takes video files"
    return None


def summary(answer: Grounding, truth: tuple[float, float] | None, video: str) -> str:
    """The status line: the answer in seconds of ``video`` (named: the page grounds the upload, or else
    the video chosen in the list), with the truth and IoU when known."""
    name = html.escape(video)
    if answer.start is None or answer.end is None:
        return f"**The answer did not parse** ({name}). Generated text: `{answer.text}`"
    text = f"**Answer: {answer.start:.2f} – {answer.end:.2f} s** of {name} ({answer.duration:.2f} s)"
    if truth is not None:
        iou = float(temporal_iou(torch.tensor([[answer.start, answer.end]]), torch.tensor([truth]))[0])
        text += f" · ground truth {truth[0]:.2f} – {truth[1]:.2f} s · IoU {iou:.2f}"
    return f"{text}\n\n`{answer.text}`"


class Demo:
    """The callbacks of the page: ground a query, show the answer."""

    def __init__(self, grounder: Grounder, examples: list[Example], clip_dir: Path) -> None:
        self.grounder, self.clip_dir = grounder, clip_dir
        self.examples = {example.label: example for example in examples}
        self.clips: deque[Path] = deque()  # the newest CLIPS_KEPT clips; older ones are deleted

    def query_of(self, label: str | None) -> str:
        return self.examples[label].query if label in self.examples else ""

    def chosen(self, label: str | None) -> tuple[str, dict]:
        """A video chosen in the list: its query, and the upload cleared (an upload is grounded first)."""
        return self.query_of(label), gr.update(value=None)

    def answer(self, label: str | None, upload: str | None, query: str) -> tuple:
        """Status, timeline, boundary frames, clip and feature picture for ``query`` about the chosen
        or uploaded video; a video file shows frames and the clip, a features-only one its features."""
        example = Example(Path(upload).name, video=Path(upload)) if upload else self.examples.get(label or "")
        try:
            if example is None:
                raise InputError("choose a video or upload one")
            if example.video is not None and (reason := not_a_video(example.video)):
                raise InputError(f"{example.video}: {reason}")
            if not normalize_query(query or ""):
                raise InputError("type a query")
            video = example.video if example.video is not None else example.features
            (answer,) = self.grounder.ground(video, [query])
        except InputError as err:  # escaped: a message naming <video> or </s> shows them
            return (
                f"**error:** {html.escape(str(err).removeprefix('query 1: '))}",
                "",
                *self.media(None, None, None),
            )
        # The truth belongs to the example's query: another one typed about the video has none known.
        asked = normalize_query(query) == normalize_query(example.query)
        truth = example.truth if asked else None
        timeline = timeline_svg(rows_of(answer, truth), answer.duration)
        segment = None if answer.start is None or answer.end is None else (answer.start, answer.end)
        return summary(answer, truth, example.label), timeline, *self.media(example, answer, segment)

    def media(self, example: Example | None, answer: Grounding | None, segment: tuple[float, float] | None):
        """Updates of the boundary frames, the clip and the feature picture (only the relevant ones show)."""
        if example is None or answer is None or segment is None:
            return (
                gr.update(value=[], visible=False),
                gr.update(value=None, visible=False),
                gr.update(value=None, visible=False),
            )
        if example.video is None:
            picture = feature_timeline(example.features.array, answer.duration, segment)
            return (
                gr.update(value=[], visible=False),
                gr.update(value=None, visible=False),
                gr.update(value=picture, visible=True),
            )
        start_frame, end_frame = frames_at(example.video, list(segment))
        pictures = [(start_frame, f"start {segment[0]:.2f} s"), (end_frame, f"end {segment[1]:.2f} s")]
        handle, name = tempfile.mkstemp(".webm", dir=self.clip_dir)
        os.close(handle)  # cut_clip writes by name (before: each answer left a descriptor open)
        clip = cut_clip(example.video, *segment, Path(name))
        self.clips.append(clip)
        while len(self.clips) > CLIPS_KEPT:  # the page shows the newest (Gradio serves its own copy)
            self.clips.popleft().unlink(missing_ok=True)
        return (
            gr.update(value=pictures, visible=True),
            gr.update(value=str(clip), visible=True),
            gr.update(value=None, visible=False),
        )


def build_app(grounder: Grounder, examples: list[Example], title: str) -> gr.Blocks:
    clip_dir = Path(tempfile.mkdtemp(prefix="timerefine-demo-"))
    atexit.register(shutil.rmtree, clip_dir, ignore_errors=True)
    demo = Demo(grounder, examples, clip_dir)
    first = examples[0].label if examples else None
    # Gradio serves a copy of each clip from its cache: copies an hour old go, every 10 minutes and at the end.
    with gr.Blocks(analytics_enabled=False, title="TimeRefine demo", delete_cache=(600, 3600)) as app:
        gr.Markdown(f"## Temporal grounding · {title}")
        with gr.Row():
            with gr.Column(scale=2):
                choice = gr.Dropdown(list(demo.examples), value=first, label="Video", elem_id="video-choice")
                upload = gr.Video(label="… or upload one", sources=["upload"], elem_id="upload", height=220)
                query = gr.Textbox(label="Query", value=demo.query_of(first), elem_id="query")
                button = gr.Button("Ground", variant="primary", elem_id="ground")
            with gr.Column(scale=3):
                status = gr.Markdown(elem_id="status")
                timeline = gr.HTML(elem_id="timeline")
                pictures = gr.Gallery(
                    label="Frames at the answer's boundaries",
                    elem_id="boundaries",
                    columns=2,
                    height=220,
                    visible=False,
                )
                clip = gr.Video(
                    label="The moment", elem_id="clip", interactive=False, height=220, visible=False
                )
                features = gr.Image(
                    label="Features over time", elem_id="features", interactive=False, visible=False
                )
        outputs = [status, timeline, pictures, clip, features]
        # One queue for both ways to ask (Gradio gives each listener its own): one answer at a time.
        choice.change(demo.chosen, choice, [query, upload], concurrency_id="choose")  # by mouse or keyboard
        choice.select(demo.chosen, choice, [query, upload], concurrency_id="choose")  # the shown one again
        button.click(demo.answer, [choice, upload, query], outputs, concurrency_id="ground")
        query.submit(demo.answer, [choice, upload, query], outputs, concurrency_id="ground")
    return app


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 1 to 65535."""
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 1 to 65535, got {text!r}")
    return port


def port_taken(port: int, err: OSError) -> InputError:
    """The error of a port the demo cannot serve on: one that needs privileges, else one in use."""
    if err.errno == errno.EACCES:
        return InputError(f"--port {port}: serving on it needs privileges; choose a port above 1023")
    return InputError(f"--port {port}: {HOST}:{port} is in use; choose another port")


def check_port(port: int) -> None:
    """InputError unless ``port`` on 127.0.0.1 is free to serve on (checked before loading the model)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind
        try:
            probe.bind((HOST, port))
        except OSError as err:
            raise port_taken(port, err) from err


def launch(app: gr.Blocks, port: int | None, block: bool = True) -> None:
    """Serve on 127.0.0.1 only; no share link, no server-side rendering (which would need Node).
    ``block``: then wait until interrupted."""
    app.launch(
        server_name=HOST,
        server_port=port,
        share=False,
        ssr_mode=False,
        quiet=True,
        css=CSS,
        prevent_thread_lock=True,
    )
    if block:
        app.block_thread()


def main(argv: list[str] | None = None) -> int:
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run directory or an exported model")
    parser.add_argument("--ckpt", default="best", help="best | last | a checkpoint path (run directories)")
    parser.add_argument("--video", type=Path, action="append", default=[], help="a video to offer (repeat)")
    parser.add_argument("--port", type=port_number, default=7860)
    add_encoder_flags(parser)  # for videos: the run's recorded encoder, else --encoder
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    transformers_logging.disable_progress_bar()
    try:
        for video in args.video:
            if not video.is_file():
                raise InputError(f"--video {missing_file(video)}")
            if reason := not_a_video(video):
                raise InputError(f"--video {video}: {reason}")
        check_port(args.port)
        grounder = Grounder.load(args.run, args.ckpt, args.device)
        use_encoder_of_flags(args, grounder)
        grounder.encoder_advice = "give --encoder"  # the demo takes video files only
        if args.video or args.encoder:  # loaded now: an encoder it lacks or cannot load is one line
            _ = grounder.encoder
        app = build_app(grounder, demo_examples(grounder, args.video), args.run.name)
        try:
            launch(app, args.port, block=False)
        except OSError as err:  # taken meanwhile
            raise port_taken(args.port, err) from err
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    terminated: list[int] = []

    def stop(signum: int, _) -> None:  # as Ctrl-C: the server closes and Gradio empties its cache
        terminated.append(signum)
        app.close()  # block_thread returns (at once if not yet waiting)

    signal.signal(signal.SIGTERM, stop)
    print(f"serving {args.run} on http://{HOST}:{args.port}", flush=True)  # after: a SIGTERM it prompts
    app.block_thread()
    return STOPPED_BY_SIGTERM if terminated else 0  # exit hooks run either way: clips go


if __name__ == "__main__":
    sys.exit(main())
