"""The frame features of a user's own input, checked against what a run reads.

A video file is decoded and encoded exactly as ``timerefine-extract-features`` does (same frame
sampling, preprocessing, encoder and float16 storage), then resampled to the run's frame count like
a feature file on disk; a feature file or an array is read and checked like the folder feature store.
Every problem is an :class:`InputError` whose one-line message names the file or argument.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import av
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from datamodules.annotation_source import STORED_FEATURES
from datamodules.feature_stores import SUFFIXES, check_features, read_error, read_feature_file, tensor_array
from grounding.answer_format.timeline import sample_frame_indices
from grounding.records import FeatureError, resample_frames
from timerefine.inference.frame_encoder import (
    ENCODER_RECORD,
    ClipFrameEncoder,
    SampledFrames,
    VideoDecodeError,
    encode_pixels,
    preprocess,
    sample_frames,
)

FEATURE_SUFFIXES = SUFFIXES
# How far a video may fall short of its header (missing frames, or seconds missing at its end), and
# a given duration differ from the video's own, in seconds or as a share, whichever is more lenient:
# headers miscount a frame or two, annotations round lengths.
SHORTFALL_FRAMES, SHORTFALL_SHARE = 2, 0.02
# Up to this many of the usual frame intervals between two frames is a dropped frame or timestamp
# jitter; the time beyond is missing, as the end of a truncated file is.
GAP_INTERVALS = 2
DURATION_SECONDS, DURATION_SHARE = 0.5, 0.05


class InputError(ValueError):
    """A video, feature file, query or run that cannot be used; the message names it."""


@dataclass(frozen=True)
class EncoderSpec:
    """How a run's features were made: the CLIP model (hub name or local path), whether its projection
    was kept, its precision and the frames sampled per video (``encoder.json`` of the extraction)."""

    model: str
    projection: bool = True
    fp16: bool = False
    num_frames: int = 100

    @classmethod
    def of(cls, record: object, where: Path) -> EncoderSpec:
        """The spec a record holds (``encoder.json``, an export's manifest); InputError naming ``where``
        when it is none."""
        types = {"model": str, "projection": bool, "fp16": bool, "num_frames": int}
        if not isinstance(record, dict) or any(not isinstance(record.get(k), t) for k, t in types.items()):
            raise InputError(f"{where}: not an encoder record ({', '.join(types)}), got {record!r}")
        return cls(**{key: record[key] for key in types})

    @classmethod
    def read(cls, path: Path) -> EncoderSpec:
        try:
            record = json.loads(path.read_text())
        except ValueError as error:
            raise InputError(f"{path}: not JSON ({error})") from error
        return cls.of(record, path)

    def as_dict(self) -> dict[str, object]:
        return {
            "model": self.model,
            "projection": self.projection,
            "fp16": self.fp16,
            "num_frames": self.num_frames,
        }


def recorded_encoder(feature_dir: str | Path | None) -> EncoderSpec | None:
    """The encoder recorded next to a feature folder, or None when there is no record."""
    record = Path(feature_dir) / ENCODER_RECORD if feature_dir else None
    return EncoderSpec.read(record) if record is not None and record.is_file() else None


def unrecorded_encoder(feature_dir: str | Path) -> str:
    """Where ``feature_dir``'s encoder record was looked for (a relative folder: from here), to say
    why a run cannot encode videos."""
    relative = "" if Path(feature_dir).is_absolute() else f", relative to {Path.cwd()}"
    return f"no {Path(feature_dir) / ENCODER_RECORD}{relative}"


def model_name(model: str) -> str:
    """The model an encoder record names, however spelt: a hub name's or a local copy's last part (a
    Hugging Face cache snapshot's by its repository's)."""
    parts = Path(model).parts
    if "snapshots" in parts and (at := parts.index("snapshots")) and parts[at - 1].startswith("models--"):
        return parts[at - 1].rpartition("--")[2]
    return Path(model).name


def encoder_change_error(trained: DictConfig, evaluated: DictConfig) -> str | None:
    """One line naming both records when the run's feature folder and the one ``evaluated`` reads
    (``data.source.feature_path``) both record their encoder (``encoder.json``) and the two differ in
    the model (:func:`model_name`: a local copy of a hub model is that model) or its output (the
    projection): the run would read features that mean something else. Precision and frames per
    video may differ (the store resamples frames). None otherwise: a folder without a record is not
    checked. InputError when a record cannot be read."""
    key = "data.source.feature_path"
    old, new = (OmegaConf.select(cfg, key, default=None) for cfg in (trained, evaluated))
    if old is None or new is None or old == new or evaluated.data.source.features not in STORED_FEATURES:
        return None
    was, now = recorded_encoder(old), recorded_encoder(new)
    if was is None or now is None:
        return None
    changed = [f"model {was.model} -> {now.model}"] if model_name(was.model) != model_name(now.model) else []
    if was.projection != now.projection:
        changed.append(f"projection {was.projection} -> {now.projection}")
    if not changed:
        return None
    return (
        f"{key}={new}: {Path(new) / ENCODER_RECORD} records other features than the run's "
        f"{Path(old) / ENCODER_RECORD} ({', '.join(changed)}); the run reads features of the encoder it was "
        "trained on"
    )


@dataclass(frozen=True)
class VideoInfo:
    duration: float  # seconds
    frames: int
    width: int
    height: int


def missing_file(path: Path) -> str:
    """Why ``path``, which is no file, cannot be read: a folder, or nothing."""
    return f"{path}: a folder, not a file" if path.is_dir() else f"{path}: no such file"


def probe_video(path: Path) -> VideoInfo:
    """Duration, frame count and size of a video file; InputError for anything unusable, a still image
    (one frame, whose duration PyAV makes up) too."""
    if not path.is_file():
        raise InputError(missing_file(path))
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:  # sound alone; else cut off before its streams' index
                damaged = "" if container.streams.audio else " (truncated or damaged, or not a video)"
                raise InputError(f"{path}: has no video stream{damaged}")
            stream = container.streams.video[0]
            frames = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            else:
                duration = (container.duration or 0) / av.time_base
            if duration <= 0:
                duration = frames / float(stream.average_rate or 25)
            width, height = stream.codec_context.width, stream.codec_context.height
    except (av.FFmpegError, OSError) as err:
        raise InputError(f"{path}: not a readable video ({type(err).__name__}: {err})") from err
    if frames == 0:
        raise InputError(f"{path}: the video stream holds no frame (shorter than one frame)")
    if frames == 1:
        raise InputError(f"{path}: a single frame (a still image?), not a video")
    return VideoInfo(duration, frames, width, height)


def positive_seconds(value: object) -> float | None:
    """``value`` as a finite number of seconds > 0, or None when it is not one."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy's scalars too
        return None
    try:
        seconds = float(value)
    except OverflowError:  # an int beyond float's range
        return None
    return seconds if math.isfinite(seconds) and seconds > 0 else None


def durations_agree(given: float, own: float) -> bool:
    """Whether a duration given for a video can be its own length (``own``), up to rounding."""
    return abs(given - own) <= max(DURATION_SECONDS, DURATION_SHARE * own)


def decoded_share(sampled: SampledFrames, duration: float) -> float:
    """The share of a ``duration``-second video that decoded: the less of its frames and its time."""
    share = sampled.decoded / sampled.promised
    return share if sampled.end is None else min(share, sampled.end / duration)


def allowed_shortfall(sampled: SampledFrames) -> float:
    """The share of a video that may not decode: :data:`SHORTFALL_SHARE` or :data:`SHORTFALL_FRAMES`."""
    return max(SHORTFALL_SHARE, SHORTFALL_FRAMES / sampled.promised)


def decodes_whole(sampled: SampledFrames, duration: float) -> bool:
    """Whether all of the video decoded, but for what :data:`SHORTFALL_FRAMES` allows."""
    return decoded_share(sampled, duration) >= 1 - allowed_shortfall(sampled)


@dataclass(frozen=True)
class Coverage:
    """The seconds of a video that its frames cover, and the spans (from, to) without frames."""

    seconds: float
    gaps: list[tuple[float, float]]


def frame_coverage(times: np.ndarray) -> Coverage | None:
    """What frames shown at ``times`` (seconds) cover: each the time to the next frame, up to
    :data:`GAP_INTERVALS` median intervals ``d``, the first also up to ``d`` before it and the last
    ``d`` after it; the gaps are where half an interval or more is left out (not rounding). None when
    ``d`` is not positive (fewer than two frames, or repeated times)."""
    times = np.sort(times)
    steps = np.diff(times)
    step = float(np.median(steps)) if len(steps) else 0.0
    if step <= 0:
        return None
    first = float(times[0])
    seconds = min(first, step) + float(np.minimum(steps, GAP_INTERVALS * step).sum()) + step
    gaps = [(0.0, first)] if first >= 1.5 * step else []
    gaps += [(float(a) + step, float(b)) for a, b in pairwise(times) if b - a >= (GAP_INTERVALS + 0.5) * step]
    return Coverage(seconds, gaps)


def encode_video(
    path: Path, encoder: ClipFrameEncoder, num_frames: int, duration: float, batch_size: int = 100
) -> np.ndarray:
    """``(num_frames, encoder.dim)`` float16 features of a ``duration``-second video, as the extraction
    tool stores them; InputError when less of it decodes than its header promises (a truncated file)
    or its frames leave time out (:func:`shortfall`)."""
    try:
        sampled = sample_frames(path, num_frames, encoder.image_size)
    except VideoDecodeError as err:
        raise InputError(str(err)) from err
    if reason := shortfall(sampled, duration):
        raise InputError(f"{path}: {reason}")
    return encode_pixels(encoder, preprocess(sampled.frames, encoder.image_size), batch_size)


def shortfall(sampled: SampledFrames, duration: float) -> str | None:
    """Why ``sampled`` does not stand for the whole ``duration``-second video, or None: less of it
    decodes than its header promises, its frames' times leave more of it uncovered (a gap in the
    middle, or a variable frame rate: frames sampled by index would not be evenly spread in time), or
    they are unevenly spread without a gap (:func:`uneven_timing`)."""
    if not decodes_whole(sampled, duration):
        end = duration if sampled.end is None else sampled.end
        return (
            f"only {decoded_share(sampled, duration):.0%} of the video decodes ({sampled.decoded} of "
            f"{sampled.promised} frames, up to {end:.2f} s of {duration:.2f} s): the file is truncated or damaged"
        )
    coverage = frame_coverage(sampled.times)
    if coverage is None or coverage.seconds / duration >= 1 - allowed_shortfall(sampled):
        return uneven_timing(sampled, duration)
    gaps = coverage.gaps
    count = f" in {len(gaps)} gaps" if len(gaps) > 1 else ""
    where = f" between {gaps[0][0]:.2f} s and {gaps[-1][1]:.2f} s" if gaps else ""
    return (
        f"frames missing{count}{where} (they cover {coverage.seconds / duration:.0%} of its {duration:.2f} s: "
        "damaged, or a variable frame rate): the answer's times would be wrong"
    )


def uneven_timing(sampled: SampledFrames, duration: float) -> str | None:
    """Why the frames sampled by index are not where an even frame rate over the video's own frames
    puts them (a rate that changes without a gap), by more than half the time between two features
    and two frame intervals (a few dropped frames); None when they are, or their times are unknown.
    The times are sorted: a file without presentation times (AVI) gives them in decoding order."""
    count = len(sampled.frames)
    if count < 2 or len(sampled.times) != sampled.promised or sampled.promised < 2:
        return None
    times = np.sort(sampled.times)
    step = (times[-1] - times[0]) / (sampled.promised - 1)
    wanted = sample_frame_indices(sampled.promised, count)
    shown, even = times[wanted], times[0] + wanted * step
    worst = int(np.argmax(np.abs(shown - even)))
    if abs(shown[worst] - even[worst]) <= max(duration / (2 * count), 2 * step):
        return None
    return (
        f"its frame rate varies (frame {wanted[worst]} is at {shown[worst]:.2f} s, where an even rate puts it at "
        f"{even[worst]:.2f} s): the answer's times would be wrong; re-encode it at a constant rate "
        "(ffmpeg -fps_mode cfr)"
    )


def checked_features(
    array: np.ndarray | torch.Tensor, name: str, feature_dim: int, num_frames: int
) -> np.ndarray:
    """A ``(T, feature_dim)`` array checked like a feature store does and resampled to ``num_frames``."""
    if isinstance(array, torch.Tensor):
        array = tensor_array(array)
    try:
        array = check_features(array, name, name, feature_dim)
    except FeatureError as err:
        raise InputError(f"{name}: {err.reason} (the run reads {feature_dim}-d features)") from err
    return resample_frames(array, num_frames)


def read_features(path: Path, feature_dim: int, num_frames: int) -> np.ndarray:
    """A ``.npy`` / ``.npz`` / ``.pt`` feature file, checked and resampled."""
    if not path.is_file():
        raise InputError(missing_file(path))
    try:
        array = read_feature_file(path)
    except Exception as err:
        raise InputError(f"{path}: unreadable feature file ({read_error(err)})") from err
    return checked_features(array, str(path), feature_dim, num_frames)
