"""Ground queries in your own video with a trained run or an exported model.

    timerefine-predict kitchen.mp4 --run runs/x --query "person opens the door" [--query ...] [--json]
    timerefine-predict features.npy --duration 31.5 --run runs/x --query "..."
    timerefine-predict pairs.jsonl --run runs/x --json        # lines {"video": ..., "query": ...[, "duration": s]}
    timerefine-predict kitchen.mp4 --run runs/x --query "..." model.inference.final=aux

A video file is encoded with the encoder the run's features were extracted with (recorded by
timerefine-extract-features; ``--encoder`` to choose another). Prints a table, or with ``--json`` a list
with one object per query: ``query``, ``start``, ``end`` (seconds), ``steps`` ([start, end] per
refinement step, first coarse segment first), ``aux`` (the aux head's segment or null), ``text``.
Overrides of ``model.inference.*`` change how the run answers (which segment is final, constrained
decoding, ordering and clipping), as they do for evaluate.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table
from transformers.utils import logging as transformers_logging

from grounding.answer_format.prompts import normalize_query
from grounding.text_files import UnreadJSON, decoded_line, json_value
from timerefine.inference.encoder_flags import add_encoder_flags, use_encoder_of_flags
from timerefine.inference.grounder import Features, Grounder, Grounding, check_device, check_queries
from timerefine.inference.video_features import (
    FEATURE_SUFFIXES,
    InputError,
    durations_agree,
    missing_file,
    positive_seconds,
    probe_video,
)
from timerefine.pipeline.arguments import OneLineParser, at_least_one


@dataclass(frozen=True)
class Request:
    video: Path
    query: str
    duration: float | None
    where: str  # what names the query in a message: "--query 2", "pairs.jsonl:3"


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """The numbered lines of a UTF-8 text file; InputError naming the line of a byte that is not."""
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            yield number, decoded_line(raw, number)
        except ValueError as err:
            raise InputError(f"{path}:{number}: {err}") from err


PAIR_KEYS = ("video", "query", "duration")


def read_pairs(path: Path) -> list[Request]:
    """The (video, query[, duration]) lines of a JSONL file, each line checked, then each video
    (:func:`check_videos`); relative videos are next to the file."""
    requests: list[Request] = []
    for number, line in text_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json_value(line)
            video, query, duration = Path(row["video"]), row["query"], row.get("duration")
        except UnreadJSON as err:
            raise InputError(f"{where}: {err}") from err
        except (ValueError, KeyError, TypeError) as err:
            raise InputError(
                f'{where}: expected {{"video": ..., "query": ...}}, got {line.strip()!r}'
            ) from err
        if unknown := sorted(set(row) - set(PAIR_KEYS)):  # a misspelt "duration" would go unread
            raise InputError(f'{where}: "{unknown[0]}" is not a key of a pair ({", ".join(PAIR_KEYS)})')
        if not isinstance(query, str):
            raise InputError(f'{where}: "query" must be a string, got {query!r}')
        if not normalize_query(query):
            raise InputError(f"{where}: the query is empty")
        seconds = None if duration is None else positive_seconds(duration)
        if duration is not None and seconds is None:
            raise InputError(f'{where}: "duration" must be a positive number of seconds, got {duration!r}')
        if seconds is None and video.suffix.lower() in FEATURE_SUFFIXES:
            raise InputError(f'{where}: "duration" is needed with a feature file, which holds no time')
        video = video if video.is_absolute() else path.parent / video
        try:
            found = video.exists()
        except (OSError, ValueError) as err:  # a name too long, a NUL byte
            raise InputError(f"{where}: {video}: not a file name here ({err})") from err
        if not found:
            raise InputError(f"{where}: {video}: no such file")
        if video.is_dir():  # "" is the .jsonl's own folder
            raise InputError(f'{where}: "video" {row["video"]!r}: {video}: a folder, not a file')
        requests.append(Request(video, query, seconds, where))
    if not requests:
        raise InputError(f"{path}: holds no (video, query) line")
    check_videos(requests)
    return requests


def check_videos(requests: list[Request]) -> None:
    """InputError naming the first line whose video cannot be read or lasts other than its given
    duration; each video is probed once, so that a bad one stops the run before any is encoded."""
    durations: dict[Path, float] = {}
    for request in requests:
        video, seconds, where = request.video, request.duration, request.where
        if video.suffix.lower() in FEATURE_SUFFIXES:
            continue
        if video not in durations:
            try:
                durations[video] = probe_video(video).duration
            except InputError as err:
                raise InputError(f"{where}: {err}") from err
        own = durations[video]
        if seconds is not None and not durations_agree(seconds, own):
            raise InputError(
                f'{where}: "duration" {seconds:g}: {video} lasts {own:.2f} s (leave "duration" out to use '
                "the video's own)"
            )


def requests_of(args: argparse.Namespace) -> list[Request]:
    if "=" in str(args.input) and not args.input.exists():
        raise InputError(f"{args.input}: an override before the input; give the input first, overrides last")
    if args.input.suffix.lower() == ".json":
        raise InputError(f'{args.input}: a pairs file is .jsonl, one {{"video", "query"}} object per line')
    if args.input.suffix.lower() == ".jsonl":
        if args.query or args.duration is not None:
            given = "--query" if args.query else "--duration"
            raise InputError(f"{given}: a .jsonl input holds each line's query and duration itself")
        if not args.input.is_file():
            raise InputError(missing_file(args.input))
        return read_pairs(args.input)
    check_queries(args.query, "--query")
    if args.duration is None and args.input.suffix.lower() in FEATURE_SUFFIXES:
        raise InputError(
            "--duration: needed with a feature file, which holds no time (the video's length in seconds)"
        )
    return [
        Request(args.input, query, args.duration, f"--query {number}")
        for number, query in enumerate(args.query, start=1)
    ]


def check_lengths(grounder: Grounder, requests: list[Request]) -> None:
    """InputError naming the first query longer than the model takes (before any video is read)."""
    for request in requests:
        if reason := grounder.query_error(request.query):
            raise InputError(f"{request.where}: {reason}")


def ground_all(grounder: Grounder, requests: list[Request], batch_size: int) -> list[tuple[Path, Grounding]]:
    """Answers in input order; each video is encoded once for all its queries, and the queries of
    consecutive videos are decoded together, ``batch_size`` at a time (a pairs file of one query per
    video batches as its videos come). Over several videos a progress bar on stderr counts them
    (stdout holds only the answers)."""
    by_video: dict[tuple[Path, float | None], list[int]] = {}
    for index, request in enumerate(requests):
        by_video.setdefault((request.video, request.duration), []).append(index)
    answers: dict[int, Grounding] = {}
    pending: list[tuple[int, Features]] = []  # (request, its video's features) not yet answered

    def answer(count: int) -> None:
        done, pending[:] = pending[:count], pending[count:]
        found = grounder.ground_pairs([(features, requests[i].query) for i, features in done], batch_size)
        answers.update(zip((i for i, _ in done), found, strict=True))

    columns = (*Progress.get_default_columns()[:-1], MofNCompleteColumn(), TimeElapsedColumn())
    bar = Progress(*columns, console=Console(stderr=True), disable=len(by_video) < 2)
    with bar:
        for (video, duration), indices in bar.track(by_video.items(), description="grounding videos"):
            features = grounder.features(video, duration)
            pending += [(i, features) for i in indices]
            while len(pending) >= batch_size:
                answer(batch_size)
        if pending:
            answer(len(pending))
    return [(requests[i].video, answers[i]) for i in range(len(requests))]


def segment_text(segment: tuple[float, float] | None) -> str:
    return "-" if segment is None else f"{segment[0]:.1f}-{segment[1]:.1f}"


def print_table(results: list[tuple[Path, Grounding]]) -> None:
    table = Table(title="Grounded queries (seconds)")
    for column in ("video", "query", "start", "end", "refinement steps", "aux"):
        table.add_column(column, justify="right" if column in ("start", "end") else "left")
    for video, answer in results:
        final = (answer.start, answer.end) if answer.start is not None else None
        table.add_row(
            video.name,
            answer.query,
            "-" if final is None else f"{final[0]:.2f}",
            "-" if final is None else f"{final[1]:.2f}",
            " -> ".join(segment_text(step) for step in answer.steps),
            segment_text(answer.aux),
        )
    Console().print(table)


def check_encoder_flags(args: argparse.Namespace, requests: list[Request]) -> None:
    """InputError for an encoder flag when every input is a feature file, which no encoder reads."""
    given = [flag for flag in ("encoder", "no_projection", "fp16") if getattr(args, flag)]
    if given and all(request.video.suffix.lower() in FEATURE_SUFFIXES for request in requests):
        raise InputError(f"--{given[0].replace('_', '-')}: the input is features, no video is encoded")


def positive_duration(text: str) -> float:
    """An argparse type: a finite number of seconds > 0."""
    try:
        value = positive_seconds(float(text))
    except ValueError:
        value = None
    if value is None:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "input", type=Path, help="a video file, a feature file (.npy/.npz/.pt) or a .jsonl of pairs"
    )
    parser.add_argument("--run", type=Path, required=True, help="a run directory or an exported model")
    parser.add_argument("--query", action="append", default=[], help="a query (repeat for several)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument("--ckpt", default="best", help="best | last | a checkpoint path (run directories)")
    parser.add_argument(
        "--duration",
        type=positive_duration,
        help="seconds; needed for a feature file (a video's own, if given)",
    )
    add_encoder_flags(parser)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=at_least_one, default=32, help="queries per generation batch")
    parser.add_argument("overrides", nargs="*", help="model.inference.* keys, e.g. model.inference.final=aux")
    args = parser.parse_intermixed_args(argv)
    transformers_logging.disable_progress_bar()
    try:
        requests = requests_of(args)
        check_encoder_flags(args, requests)
        check_device(args.device, "--device")
        grounder = Grounder.load(args.run, args.ckpt, args.device, overrides=args.overrides)
        use_encoder_of_flags(args, grounder)
        check_lengths(grounder, requests)
        results = ground_all(grounder, requests, args.batch_size)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        if args.json:  # one object per line
            rows = [json.dumps({"video": str(video), **answer.as_json()}) for video, answer in results]
            print("[\n" + ",\n".join(rows) + "\n]", flush=True)
        else:
            print_table(results)
            sys.stdout.flush()
    except BrokenPipeError:  # a reader that stopped early (| head): exit 1 quietly, as Rich's table does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit, too
        return 1
    except OSError as err:  # a full disk
        print(f"error: writing the answers to stdout: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
