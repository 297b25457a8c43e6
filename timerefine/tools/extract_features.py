"""Extract per-frame CLIP features from videos: ``{video_id}.npy`` float16 ``(num_frames, D)`` files.

    timerefine-extract-features VIDEO_DIR OUT_DIR --model openai/clip-vit-large-patch14 \\
        --num-frames 100 --batch-size 100 --device cuda --fp16

Frames are decoded in DataLoader workers (new interpreters, not forks) and encoded as
``timerefine/inference/frame_encoder.py`` says (with ``--no-projection``, the pooled output is kept).
Finished videos are skipped, outputs are written atomically, and undecodable videos are counted and
reported (or raise with ``--strict``).
``OUT_DIR/encoder.json`` records the encoder and frame count, so a trained run can encode a new video
the same way (``timerefine-predict``).
"""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from grounding.checks import a_writable_folder
from timerefine.inference.frame_encoder import (
    ENCODER_RECORD,
    ClipFrameEncoder,
    EncoderLoadError,
    VideoDecodeError,
    encode_pixels,
    encoder_record,
    preprocess,
    sample_frames,
)
from timerefine.inference.grounder import check_device
from timerefine.inference.video_features import InputError, probe_video, shortfall
from timerefine.pipeline.arguments import OneLineParser, at_least, at_least_one
from timerefine.pipeline.whole_files import write_whole

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (
    ".mp4",
    ".m4v",
    ".mkv",
    ".webm",
    ".avi",
    ".mov",
    ".mpg",
    ".mpeg",
    ".ts",
    ".flv",
    ".wmv",
    ".3gp",
)


class _VideoFrames(Dataset):
    """Decoded, preprocessed frames per video; a decode failure is returned, not raised."""

    def __init__(self, paths: Sequence[Path], num_frames: int, image_size: int) -> None:
        self.paths, self.num_frames, self.image_size = paths, num_frames, image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[str, torch.Tensor | VideoDecodeError]:
        """A file that is no video (checked first, as predict does), or a truncated or damaged one
        (:func:`shortfall`), fails too."""
        path = self.paths[i]
        try:
            duration = probe_video(path).duration
            sampled = sample_frames(path, self.num_frames, self.image_size)
            if reason := shortfall(sampled, duration):
                raise VideoDecodeError(path, reason)
            return path.stem, preprocess(sampled.frames, self.image_size)
        except VideoDecodeError as err:
            return path.stem, err
        except InputError as err:
            return path.stem, VideoDecodeError(path, str(err))


@dataclass
class ExtractReport:
    """Videos encoded now, skipped as already done, and failed (video id -> error message)."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def is_complete(path: Path, num_frames: int, dim: int) -> bool:
    """Whether ``path`` already holds a loadable, finite ``(num_frames, dim)`` array."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        return array.shape == (num_frames, dim) and bool(np.isfinite(array).all())
    except (OSError, ValueError):
        return False


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` as the bytes of a ``.npy`` file."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def check_outputs(videos: list[Path], out_dir: Path, record: dict[str, object]) -> None:
    """InputError when two videos would write one feature file, or ``out_dir`` holds features that
    another encoder (or frame count) made: mixed, they would pass for one encoder's."""
    stems: dict[str, Path] = {}
    for path in videos:
        if (first := stems.setdefault(path.stem, path)) != path:
            raise InputError(
                f"{first} and {path}: both would be written to {out_dir / path.stem}.npy; rename one"
            )
    recorded = out_dir / ENCODER_RECORD
    if not recorded.is_file():
        if features := sorted(p.name for p in out_dir.glob("[!.]*.npy")):
            raise InputError(
                f"{out_dir}: holds .npy feature files ({len(features)}: {features[0]}, ...) but no {ENCODER_RECORD}, "
                "so what made them is unknown and they would pass for this encoder's; give another OUT_DIR"
            )
        return
    try:
        before = json.loads(recorded.read_text())
        if not isinstance(before, dict):
            raise ValueError(f"a JSON {type(before).__name__}, not an object")
    except ValueError as error:
        raise InputError(f"{recorded}: not an encoder record ({error}); give another OUT_DIR") from error
    if changed := [f"{k} {before.get(k)} -> {v}" for k, v in record.items() if before.get(k) != v]:
        raise InputError(
            f"{recorded}: {out_dir} holds features made otherwise ({', '.join(changed)}); give another OUT_DIR"
        )


def extract(
    videos: Sequence[str | Path],
    encoder: ClipFrameEncoder,
    out_dir: str | Path,
    num_frames: int = 100,
    batch_size: int = 100,
    workers: int = 0,
    strict: bool = False,
) -> ExtractReport:
    """Encode each video's frames to ``out_dir/{video_id}.npy`` (float16), skipping finished ones."""
    out_dir, report = Path(out_dir), ExtractReport()
    if reason := a_writable_folder(str(out_dir)):
        raise InputError(f"OUT_DIR {out_dir}: {reason}")
    check_outputs(list(map(Path, videos)), out_dir, encoder_record(encoder, num_frames))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # e.g. below a folder no one may make folders in
        raise InputError(f"OUT_DIR {out_dir}: cannot make it ({error.strerror})") from error
    write_whole(out_dir / ENCODER_RECORD, json.dumps(encoder_record(encoder, num_frames), indent=2) + "\n")
    todo = []
    for path in map(Path, videos):
        if is_complete(out_dir / f"{path.stem}.npy", num_frames, encoder.dim):
            report.skipped.append(path.stem)
        else:
            todo.append(path)
    frames = _VideoFrames(todo, num_frames, encoder.image_size)
    # Workers start as new interpreters: a fork copies the locks that this process's other threads
    # hold (a progress bar's monitor, FFmpeg's decoders), and a worker that takes one waits forever.
    start = {"multiprocessing_context": "spawn"} if workers else {}
    for video_id, pixels in DataLoader(frames, batch_size=None, num_workers=workers, **start):
        if isinstance(pixels, VideoDecodeError):
            if strict:
                raise pixels
            log.warning("skipped: %s", pixels)
            report.failed[video_id] = str(pixels)
            continue
        write_whole(out_dir / f"{video_id}.npy", npy_bytes(encode_pixels(encoder, pixels, batch_size)))
        report.done.append(video_id)
    log.info(
        "encoded %d, skipped %d done, %d failed", len(report.done), len(report.skipped), len(report.failed)
    )
    return report


def videos_in(video_dir: Path, out_dir: Path) -> list[Path]:
    """The videos of ``video_dir`` (by their suffix; other files but hidden ones and the features
    written beside them are left out with a warning naming them); InputError when it is no folder of
    videos or ``out_dir`` is a file."""
    if not video_dir.is_dir():
        raise InputError(f"{video_dir}: no such folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a folder")
    entries = sorted(video_dir.iterdir())
    files = [p for p in entries if not p.is_dir()]  # a link to nowhere fails, counted
    videos = [p for p in files if p.suffix.lower() in VIDEO_SUFFIXES]
    if not videos:
        raise InputError(f"{video_dir}: holds no video ({', '.join(VIDEO_SUFFIXES)})")
    ours = (ENCODER_RECORD, ".npy") if out_dir.resolve() == video_dir.resolve() else ()  # features beside
    quiet = [p for p in files if p.name.startswith(".") or p.name.endswith(ours)]  # hidden, or our outputs
    if others := [p.name for p in files if p not in videos and p not in quiet]:
        log.warning(
            "left out %d files not named as videos (%s): %s",
            len(others),
            " ".join(VIDEO_SUFFIXES),
            some(others),
        )
    folders = [
        p.name
        for p in entries
        if p.is_dir() and not p.name.startswith(".") and p.resolve() != out_dir.resolve()
    ]
    if folders:
        log.warning(
            "left out %d folders (the videos directly in %s are read): %s",
            len(folders),
            video_dir,
            some(folders),
        )
    return videos


def some(names: list[str]) -> str:
    """The first five of ``names`` and how many more."""
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("video_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--model", default="openai/clip-vit-large-patch14", help="hub name or local path")
    parser.add_argument(
        "--no-projection", action="store_true", help="keep the pooled output, not the projection"
    )
    parser.add_argument("--num-frames", type=at_least_one, default=100)
    parser.add_argument(
        "--batch-size", type=at_least_one, default=100, help="frames per encoder forward pass"
    )
    parser.add_argument("--workers", type=at_least(0), default=2, help="decoding processes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--strict", action="store_true", help="stop at the first undecodable video")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        videos = videos_in(args.video_dir, args.out_dir)
        check_device(args.device, "--device")
        try:
            encoder = ClipFrameEncoder(args.model, not args.no_projection, args.device, args.fp16)
        except EncoderLoadError as error:
            raise InputError(f"--model {args.model}: {error}") from error
        report = extract(
            videos, encoder, args.out_dir, args.num_frames, args.batch_size, args.workers, args.strict
        )
    except (InputError, VideoDecodeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"encoded {len(report.done)}, skipped {len(report.skipped)} done, {len(report.failed)} failed")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
