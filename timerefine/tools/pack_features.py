"""Pack a folder of per-video feature files into a litdata dataset readable by PackedFeatureStore.

    timerefine-pack-features SRC_DIR DST_DIR --num-frames 100 --feature-dim 768 --workers 4

Every file is validated first (readable, of the right size, finite once stored as ``--dtype``); bad
ones are reported (video, file, reason) and left out, and the command then exits with status 1.
The extraction's ``encoder.json`` (timerefine-extract-features) is copied beside the packed features,
so a run trained on them encodes a new video as they were encoded (timerefine-predict).
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from datamodules.feature_packing import optimize_in_child, pack_item
from datamodules.feature_stores import PACKED_META, FolderFeatureStore
from grounding.checks import a_writable_folder
from grounding.records import FeatureError
from timerefine.inference.frame_encoder import ENCODER_RECORD
from timerefine.inference.video_features import EncoderSpec
from timerefine.pipeline.arguments import OneLineParser, at_least_one
from timerefine.pipeline.errors import INTERRUPTED, STOPPED_BY_SIGTERM
from timerefine.pipeline.whole_files import write_whole

log = logging.getLogger(__name__)


@dataclass
class PackReport:
    """Videos packed and the files left out, with their error messages."""

    packed: list[str] = field(default_factory=list)
    bad: dict[str, str] = field(default_factory=dict)


def out_of_range(features: np.ndarray, dtype: str) -> str | None:
    """Why ``features`` cannot be stored as ``dtype`` (a value would become inf); None when they can."""
    with np.errstate(over="ignore"):  # the overflow is the answer, not a warning
        if np.isfinite(features.astype(dtype)).all():
            return None
    largest, limit = float(np.abs(features).max()), float(np.finfo(dtype).max)
    return f"beyond {dtype}'s range (largest |value| {largest:.0e} > {limit:g})"


def pack_folder(
    src: str | Path,
    dst: str | Path,
    num_frames: int = 100,
    feature_dim: int = 768,
    workers: int = 1,
    dtype: str = "float16",
) -> PackReport:
    """Validate every file in ``src``, pack the good ones into ``dst`` and write the id index there."""
    from litdata import StreamingDataset

    src, dst = Path(src).resolve(), Path(dst).resolve()
    if not src.is_dir():
        what = "a file, not a folder" if src.exists() else "no such folder"
        raise FileNotFoundError(f"{src}: {what} of feature files")
    if (src / PACKED_META).is_file():
        raise FileExistsError(f"{src}: a packed feature store already; pack a folder of feature files")
    encoder = src / ENCODER_RECORD  # copied: a run trained on the packed features encodes videos alike
    if encoder.is_file():
        EncoderSpec.read(encoder)  # an InputError (a ValueError) names it
    if reason := a_writable_folder(str(dst)):
        raise FileExistsError(f"{reason}; pack into a new folder")
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} is not empty; pack into a new folder")
    store, report = FolderFeatureStore(src, num_frames, feature_dim), PackReport()
    for video_id in store.video_ids():
        try:
            if reason := out_of_range(store.load(video_id), dtype):
                raise FeatureError(video_id, str(store.path(video_id)), reason)
            report.packed.append(video_id)
        except FeatureError as err:
            report.bad[video_id] = str(err)
    for message in report.bad.values():
        log.warning("left out: %s", message)
    if not report.packed:
        raise ValueError(f"no usable feature file in {src} ({len(report.bad)} bad)")
    try:  # here, so that a folder that cannot be made is one line, not the packing child's traceback
        dst.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FileExistsError(f"{dst}: cannot be made ({error.strerror})") from error
    optimize_in_child(
        fn=functools.partial(
            pack_item, src=str(src), num_frames=num_frames, feature_dim=feature_dim, dtype=dtype
        ),
        inputs=report.packed,
        output_dir=str(dst),
        chunk_bytes="64MB",
        num_workers=max(1, workers),
        verbose=False,
    )
    dataset = StreamingDataset(str(dst))
    index = {dataset[i]["video_id"]: i for i in range(len(dataset))}
    if sorted(index) != report.packed:
        raise RuntimeError(f"{dst}: packed {len(index)} videos, expected {len(report.packed)}")
    meta = {"num_frames": num_frames, "feature_dim": feature_dim, "dtype": dtype, "index": index}
    write_whole(dst / PACKED_META, json.dumps(meta))
    if encoder.is_file():
        write_whole(dst / ENCODER_RECORD, encoder.read_bytes())
    log.info("packed %d videos into %s (%d bad files left out)", len(index), dst, len(report.bad))
    return report


class Stopped(Exception):
    """SIGTERM arrived while packing."""


def stop_packing(signum: int, frame: object) -> None:
    """SIGTERM's handler: the packing stops (its child process too, see ``optimize_in_child``)."""
    raise Stopped


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="folder of {video_id}.npy/.npz/.pt feature files")
    parser.add_argument("dst", help="new, empty output folder")
    parser.add_argument("--num-frames", type=at_least_one, default=100)
    parser.add_argument("--feature-dim", type=at_least_one, default=768)
    parser.add_argument("--workers", type=at_least_one, default=1)
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    previous = signal.signal(signal.SIGTERM, stop_packing)
    try:
        report = pack_folder(args.src, args.dst, args.num_frames, args.feature_dim, args.workers, args.dtype)
    except (FileNotFoundError, FileExistsError, ValueError) as error:  # no usable file, a bad encoder.json
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Stopped:
        print(
            f"stopped by SIGTERM: {args.dst} is incomplete; delete it before packing again", file=sys.stderr
        )
        return STOPPED_BY_SIGTERM
    except KeyboardInterrupt:
        print(f"interrupted: {args.dst} is incomplete; delete it before packing again", file=sys.stderr)
        return INTERRUPTED
    except RuntimeError as error:  # the packing child's (a full disk, say), its message above
        print(f"error: {error}; {args.dst} is incomplete: delete it before packing again", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"packed {len(report.packed)} videos, {len(report.bad)} bad files left out")
    return 1 if report.bad else 0


if __name__ == "__main__":
    sys.exit(main())
