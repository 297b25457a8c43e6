"""Ground text queries in your own video with a trained run (or an exported model).

    grounder = Grounder.from_run("runs/x")                 # or Grounder.from_export("exported/x")
    for answer in grounder.ground("kitchen.mp4", ["person opens the door", "someone sits down"]):
        print(answer.start, answer.end, answer.steps)

``video`` is a video file (encoded with the encoder the run's features came from), a feature file
(``.npy`` / ``.npz`` / ``.pt``, any number of rows) or a ``(T, D)`` array; feature inputs hold no time,
so they need ``duration``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from grounding.answer_format.predictions import Prediction, seconds
from grounding.answer_format.prompts import normalize_query
from grounding.answer_format.timeline import Timeline
from timerefine.inference.export_folder import MANIFEST, is_export, load_export
from timerefine.inference.frame_encoder import ClipFrameEncoder, EncoderLoadError
from timerefine.inference.run_loading import LoadedRun, load_run, predict, query_error
from timerefine.inference.video_features import (
    ENCODER_RECORD,
    FEATURE_SUFFIXES,
    EncoderSpec,
    InputError,
    checked_features,
    durations_agree,
    encode_video,
    positive_seconds,
    probe_video,
    read_features,
    recorded_encoder,
    unrecorded_encoder,
)

Segment = tuple[float, float]
VideoInput = str | Path | np.ndarray | torch.Tensor


@dataclass(frozen=True)
class Grounding:
    """One query's answer in seconds: the final segment (None when the answer did not parse), every
    refinement step's segment (first coarse one first), the aux head's segment, the generated text."""

    query: str
    start: float | None
    end: float | None
    steps: list[Segment]
    aux: Segment | None
    text: str
    duration: float

    def as_json(self) -> dict[str, object]:
        def rounded(segment: Segment | None) -> list[float] | None:
            return None if segment is None else [round(x, 3) for x in segment]

        final = rounded(None if self.start is None else (self.start, self.end))
        return {
            "query": self.query,
            "start": final and final[0],
            "end": final and final[1],
            "steps": [rounded(step) for step in self.steps],
            "aux": rounded(self.aux),
            "text": self.text,
            "duration": self.duration,
        }


def to_grounding(
    query: str, prediction: Prediction, duration: float, timeline: Timeline, clip: bool = True
) -> Grounding:
    """A prediction in ``timeline``'s frame indices as seconds of a ``duration``-second video, its ends
    clipped to the video unless ``clip`` is off (as the run scores it: ``model.inference.order_and_clip``)."""

    def in_seconds(segment: Segment) -> Segment:
        return seconds(segment, duration, timeline, clip)

    final = None if prediction.final is None else in_seconds(prediction.final)
    return Grounding(
        query,
        None if final is None else final[0],
        None if final is None else final[1],
        [in_seconds(segment) for segment in prediction.segments],
        None if prediction.aux is None else in_seconds(prediction.aux),
        prediction.text,
        duration,
    )


def check_queries(queries: Sequence[str], name: str = "query") -> None:
    """InputError unless there is at least one query and none is empty; ``name``: what the message
    calls them (a command line's flag)."""
    if not queries:
        raise InputError(f"{name}: give at least one query")
    for number, query in enumerate(queries, start=1):
        if not isinstance(query, str):
            raise InputError(f"{name} {number}: must be text, got {query!r}")
        if not normalize_query(query):
            raise InputError(f"{name} {number}: the query is empty")


@dataclass(frozen=True)
class Features:
    """A video's features as the run reads them, ``(num_frames, feature_dim)``, and its duration in
    seconds (InputError unless a positive number); ``Grounder.features`` makes them."""

    array: np.ndarray
    duration: float

    def __post_init__(self) -> None:
        if (seconds := positive_seconds(self.duration)) is None:
            raise InputError(f"Features duration={self.duration!r}: must be a positive number of seconds")
        object.__setattr__(self, "duration", seconds)  # a numpy scalar's type stays out of the answers


def device_error(device: str) -> str | None:
    """Why ``device`` cannot run a model here (not a torch device, or no such CUDA/MPS device); None if it can."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        return "not a device (cpu, cuda, cuda:1, mps, ...)"
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        return f"no such CUDA device here ({torch.cuda.device_count()} found)"
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        return "no MPS device here"
    return None


def check_device(device: str, name: str = "device") -> None:
    """InputError when ``device`` is not one this machine has; ``name``: what the message calls it."""
    if reason := device_error(device):
        raise InputError(f"{name} {device}: {reason}")


class Grounder:
    """A trained model that answers grounding queries about any video."""

    # What the error of a run without an encoder advises (a command line says its own flag).
    encoder_advice = (
        "give an encoder (Grounder's encoder argument, timerefine-predict --encoder) or a feature file"
    )

    def __init__(self, run: LoadedRun, encoder: EncoderSpec | None = None, origin: str = "encoder") -> None:
        """``origin`` names where ``encoder`` came from in messages (a flag, or the record it was read from)."""
        self.run, self.encoder_spec, self.encoder_origin = run, encoder, origin
        self._encoder: ClipFrameEncoder | None = None

    def use_encoder(self, encoder: EncoderSpec, origin: str = "encoder") -> None:
        """Encode videos with ``encoder`` from now on."""
        self.encoder_spec, self.encoder_origin, self._encoder = encoder, origin, None

    @classmethod
    def from_run(
        cls,
        run_dir: str | Path,
        ckpt: str = "best",
        device: str = "cpu",
        encoder: EncoderSpec | None = None,
        overrides: Sequence[str] = (),
    ) -> Grounder:
        """A run's ``best`` / ``last`` / given checkpoint; videos are encoded with ``encoder``, else
        with the one recorded next to the run's features (``encoder.json`` of the extraction).
        ``overrides`` change how it answers: ``model.inference.*`` keys, e.g. ``model.inference.final=aux``."""
        check_device(device)
        run = load_run(Path(run_dir), ckpt, device, overrides)
        if encoder is not None:
            return cls(run, encoder)
        features = run.cfg.data.source.get("feature_path")
        if recorded := recorded_encoder(features):
            return cls(run, recorded, f"{Path(features) / ENCODER_RECORD}: model")
        return cls(run)

    @classmethod
    def from_export(
        cls,
        folder: str | Path,
        device: str = "cpu",
        encoder: EncoderSpec | None = None,
        overrides: Sequence[str] = (),
    ) -> Grounder:
        """An exported model (``timerefine-export``): no Lightning checkpoint needed."""
        check_device(device)
        run, recorded = load_export(Path(folder), device, overrides)
        return cls(run, encoder) if encoder else cls(run, recorded, f"{Path(folder) / MANIFEST}: encoder")

    @classmethod
    def load(
        cls,
        path: str | Path,
        ckpt: str = "best",
        device: str = "cpu",
        encoder: EncoderSpec | None = None,
        overrides: Sequence[str] = (),
    ) -> Grounder:
        """``from_export`` for an exported folder (which holds one set of weights: no ``ckpt``),
        ``from_run`` for a run directory."""
        if is_export(Path(path)):
            if ckpt != "best":
                raise InputError(f"ckpt {ckpt}: {path} is an exported model, which holds one set of weights")
            return cls.from_export(path, device, encoder, overrides)
        return cls.from_run(path, ckpt, device, encoder, overrides)

    @property
    def encoder(self) -> ClipFrameEncoder:
        """The video encoder (loaded on first use); InputError when the run records none."""
        if self._encoder is None:
            spec = self.encoder_spec
            if spec is None:
                features = self.run.cfg.data.source.get("feature_path")
                why = f"{unrecorded_encoder(features)}: moved, or" if features else "its"
                if is_export(self.run.weights):  # its export.json holds the record, or none
                    why = f"{self.run.weights / MANIFEST} records none: not found when exported, or its"
                raise InputError(
                    f"the run records no video encoder ({why} features were not made by "
                    f"timerefine-extract-features): {self.encoder_advice}"
                )
            try:
                encoder = ClipFrameEncoder(
                    spec.model, spec.projection, str(self.run.module.device), spec.fp16
                )
            except EncoderLoadError as err:
                raise InputError(f"{self.encoder_origin} {spec.model}: {err}") from err
            if encoder.dim != self.run.feature_dim:
                raise InputError(
                    f"{self.encoder_origin} {spec.model}: makes {encoder.dim}-d features, the run reads "
                    f"{self.run.feature_dim}-d"
                )
            self._encoder = encoder
        return self._encoder

    def features(self, video: VideoInput, duration: float | None = None) -> Features:
        """The run's view of ``video``: ``(num_frames, feature_dim)`` float32 features and the duration
        (a video file's own, or ``duration`` when it agrees with it up to rounding)."""
        frames, dim = self.run.num_frames, self.run.feature_dim
        if duration is not None:  # as a float: numpy's and other numbers' types stay out of answers
            if (seconds := positive_seconds(duration)) is None:
                raise InputError(f"duration {duration!r}: must be a positive number of seconds")
            duration = seconds
        if isinstance(video, (str, Path)) and Path(video).suffix.lower() not in FEATURE_SUFFIXES:
            info = probe_video(Path(video))
            if duration is not None and not durations_agree(duration, info.duration):
                raise InputError(
                    f"duration {duration:g}: {video} lasts {info.duration:.2f} s (leave the duration "
                    "out to use the video's own)"
                )
            sampled = encode_video(Path(video), self.encoder, self.encoder_spec.num_frames, info.duration)
            return Features(checked_features(sampled, str(video), dim, frames), duration or info.duration)
        if duration is None:
            raise InputError(
                "duration: needed with features, which hold no time (the video's length in seconds)"
            )
        if isinstance(video, (str, Path)):
            return Features(read_features(Path(video), dim, frames), float(duration))
        return Features(checked_features(video, "the feature array", dim, frames), float(duration))

    def checked(self, features: Features, duration: float | None = None) -> Features:
        """``features`` if the run can read them: shape ``(num_frames, feature_dim)`` and values checked
        like a feature file's; InputError otherwise, or when a ``duration`` is given (they hold their own)."""
        if duration is not None:
            raise InputError(
                f"duration={duration!r}: a Features object holds its duration ({features.duration:g} s); "
                "leave duration out"
            )
        frames, dim = self.run.num_frames, self.run.feature_dim
        if (shape := tuple(np.shape(features.array))) != (frames, dim):
            raise InputError(
                f"the Features array has shape {shape}, the run reads ({frames}, {dim}) "
                "(Grounder.features makes them from a video, a feature file or a (T, D) array)"
            )
        array = checked_features(features.array, "the Features array", dim, frames)
        return Features(array, features.duration)

    def query_error(self, query: str) -> str | None:
        """Why the model cannot take ``query`` (longer than its language model's positions), or None."""
        return query_error(self.run, query)

    def ground(
        self,
        video: VideoInput | Features,
        queries: str | Sequence[str],
        duration: float | None = None,
        batch_size: int = 32,
    ) -> list[Grounding]:
        """One answer per query, decoded in batches of ``batch_size`` queries. ``duration`` is for a
        feature file or array (see :meth:`features`); a :class:`Features` holds its own, so none is taken."""
        if isinstance(queries, (bytes, bytearray)):
            raise InputError("queries: give a text or texts, got bytes (decode them first)")
        try:  # a text, or any iterable of them (a list, an array, a pandas column)
            queries = [queries] if isinstance(queries, str) else list(queries)
        except TypeError as error:
            raise InputError(f"queries: give a text or texts, got {type(queries).__name__}") from error
        self._check_queries(queries, batch_size)
        if isinstance(video, Features):
            features = self.checked(video, duration)
        else:
            features = self.features(video, duration)
        return self._answers([features] * len(queries), queries, batch_size)

    def ground_pairs(self, pairs: Sequence[tuple[Features, str]], batch_size: int = 32) -> list[Grounding]:
        """One answer per (features, query) pair, in order, decoded in batches of ``batch_size`` pairs
        that mix videos (many videos of a query or two each batch as well as one video's many queries);
        :meth:`features` makes each video's :class:`Features` once."""
        for number, pair in enumerate(pairs, start=1):
            items = pair if isinstance(pair, (tuple, list)) else [pair]
            if len(items) != 2 or not isinstance(items[0], Features):
                raise InputError(
                    f"pair {number}: must be (Features, query), got ({', '.join(type(x).__name__ for x in items)}); "
                    "Grounder.features(video, duration) makes the Features"
                )
        queries = [query for _, query in pairs]
        self._check_queries(queries, batch_size)
        return self._answers([self.checked(features) for features, _ in pairs], queries, batch_size)

    def _check_queries(self, queries: list[str], batch_size: int) -> None:
        check_queries(queries)
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise InputError(f"batch_size={batch_size!r}: must be a whole number >= 1")
        for number, query in enumerate(queries, start=1):
            if reason := self.query_error(query):
                raise InputError(f"query {number}: {reason}")

    def _answers(self, features: list[Features], queries: list[str], batch_size: int) -> list[Grounding]:
        """The answer to each query about the video of its ``features``, ``batch_size`` rows at a time."""
        module, answers = self.run.module, []
        for start in range(0, len(queries), batch_size):
            rows = range(start, min(start + batch_size, len(queries)))
            arrays = torch.stack([torch.from_numpy(features[row].array) for row in rows])
            predictions = predict(self.run, arrays, [queries[row] for row in rows])
            answers += [
                to_grounding(
                    queries[row],
                    prediction,
                    features[row].duration,
                    module.timeline,
                    module.inference.order_and_clip,
                )
                for row, prediction in zip(rows, predictions, strict=True)
            ]
        return answers
