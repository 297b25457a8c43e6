"""A procedurally generated, Charades-like grounding dataset that needs no download.

Each video (10-60 s, ``num_frames`` feature rows) holds 2-4 events, each a (verb, object) pair.
Frames inside an event carry that event's signature (its verb and object vectors) plus noise.
A query names one event and the others are distractors, so the model has to read the query; like
Charades-STA, a video can be queried several times (``queries_per_video``), once per event.
Everything is a pure function of the config and the seed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from datamodules.feature_stores import GeneratedFeatures
from grounding.answer_format.timeline import frame_times
from grounding.checks import NON_NEGATIVE, POSITIVE, Checked, checked, integer, number
from grounding.records import FeatureError, GroundingRecord

VERBS = (
    ("opens", "is opening", ""),
    ("closes", "is closing", ""),
    ("holds", "is holding", ""),
    ("puts down", "is putting down", ""),
    ("sits", "is sitting", " on"),
    ("looks", "is looking", " at"),
    ("cleans", "is cleaning", ""),
    ("throws", "is throwing", ""),
    ("takes", "is taking", ""),
    ("walks", "is walking", " to"),
)
OBJECTS = (
    "door",
    "chair",
    "book",
    "phone",
    "cup",
    "laptop",
    "window",
    "towel",
    "bag",
    "sandwich",
    "shoe",
    "pillow",
)
SUBJECTS = ("person", "a person", "the person", "someone")


@dataclass(frozen=True)
class BuiltinSpec(Checked):
    """Sizes and difficulty of the built-in dataset."""

    num_train: int = checked(4000, integer(1))
    num_val: int = checked(200, integer(1))
    num_test: int = checked(500, integer(1))
    num_frames: int = checked(100, integer(1))
    feature_dim: int = checked(64, integer(1))
    min_duration: float = checked(10.0, POSITIVE)
    max_duration: float = checked(60.0, POSITIVE)
    min_events: int = checked(2, integer(1))
    max_events: int = checked(4, integer(1))
    min_event_fraction: float = checked(0.1, number(0, 1, open_low=True))
    max_event_fraction: float = checked(0.4, number(0, 1, open_low=True))
    signal: float = checked(1.0, NON_NEGATIVE)
    noise: float = checked(0.5, NON_NEGATIVE)
    seed: int = 0
    queries_per_video: int = checked(1, integer(1))

    def relations(self) -> Iterator[str]:
        for name in ("duration", "events", "event_fraction"):
            low, high = getattr(self, f"min_{name}"), getattr(self, f"max_{name}")
            if low > high:
                yield f"min_{name}={low} must not exceed max_{name}={high}"


@dataclass(frozen=True)
class BuiltinEvent:
    verb: int
    obj: int
    start: float
    end: float


@dataclass(frozen=True)
class BuiltinSample:
    """One video: ``records[k]`` queries ``events[k]``; for it, the other events are distractors."""

    records: tuple[GroundingRecord, ...]
    features: np.ndarray
    events: tuple[BuiltinEvent, ...]

    @property
    def record(self) -> GroundingRecord:
        return self.records[0]


@lru_cache(maxsize=8)
def _vocabulary_vectors(spec: BuiltinSpec) -> tuple[np.ndarray, np.ndarray]:
    """One vector per verb and per object, each of norm sqrt(feature_dim); computed once per spec."""
    rng = np.random.default_rng([spec.seed, 7919])

    def unit_rows(count: int) -> np.ndarray:
        rows = rng.normal(size=(count, spec.feature_dim))
        return rows / np.linalg.norm(rows, axis=1, keepdims=True) * np.sqrt(spec.feature_dim)

    return unit_rows(len(VERBS)), unit_rows(len(OBJECTS))


def describe(verb: int, obj: int, rng: np.random.Generator) -> str:
    """A natural-language query naming one (verb, object) event, in varied phrasing."""
    third, progressive, preposition = VERBS[verb]
    form = third if rng.random() < 0.5 else progressive
    article = "the" if rng.random() < 0.6 else "a"
    sentence = f"{SUBJECTS[rng.integers(len(SUBJECTS))]} {form}{preposition} {article} {OBJECTS[obj]}"
    return sentence + ("." if rng.random() < 0.5 else "")


def make_sample(spec: BuiltinSpec, split: str, index: int) -> BuiltinSample:
    """Video ``index`` of ``split`` with its queries, identical for the same spec and seed."""
    split_id = {"train": 0, "val": 1, "test": 2}[split]
    rng = np.random.default_rng([spec.seed, split_id, index])
    verbs, objects = _vocabulary_vectors(spec)
    duration = float(np.round(rng.uniform(spec.min_duration, spec.max_duration), 1))
    n_events = int(rng.integers(spec.min_events, spec.max_events + 1))
    pairs = rng.choice(len(VERBS) * len(OBJECTS), size=n_events, replace=False)

    times = frame_times(spec.num_frames, duration)
    features = rng.normal(0.0, spec.noise, size=(spec.num_frames, spec.feature_dim))
    segments = []
    for pair in pairs:
        verb, obj = divmod(int(pair), len(OBJECTS))
        length = rng.uniform(spec.min_event_fraction, spec.max_event_fraction) * duration
        start = float(np.round(rng.uniform(0.0, duration - length), 1))
        end = float(min(np.round(start + length, 1), duration))
        inside = (times >= start) & (times <= end)
        features[inside] += spec.signal * (verbs[verb] + objects[obj]) / 2
        segments.append(BuiltinEvent(verb, obj, start, end))

    records = tuple(
        GroundingRecord(
            qid=f"builtin:{split}:{index:06d}:{k}",
            video_id=f"builtin_{split}_{index:06d}",
            query=describe(event.verb, event.obj, rng),
            duration=duration,
            start=event.start,
            end=event.end,
        )
        for k, event in enumerate(segments[: spec.queries_per_video])
    )
    return BuiltinSample(records, features.astype(np.float32), tuple(segments))


def split_videos(spec: BuiltinSpec, split: str) -> int:
    return {"train": spec.num_train, "val": spec.num_val, "test": spec.num_test}[split]


class BuiltinFeatureStore:
    """Serves the generated features of one split by video id (the FeatureStore contract)."""

    def __init__(self, spec: BuiltinSpec, split: str) -> None:
        self.spec, self.split = spec, split
        self.num_frames, self.feature_dim = spec.num_frames, spec.feature_dim
        self.generated = GeneratedFeatures(self._make)

    def load(self, video_id: str) -> np.ndarray:
        return self.generated.load(video_id)

    def source(self, video_id: str) -> str:
        return f"builtin:{self.split}"

    def _make(self, video_id: str) -> np.ndarray:
        index = video_id.removeprefix(f"builtin_{self.split}_")
        if not (index.isdigit() and video_id != index and int(index) < split_videos(self.spec, self.split)):
            raise FeatureError(video_id, self.source(video_id), "missing: not a video of this split")
        return make_sample(self.spec, self.split, int(index)).features


def builtin_records(spec: BuiltinSpec, split: str) -> list[GroundingRecord]:
    return [r for i in range(split_videos(spec, split)) for r in make_sample(spec, split, i).records]
