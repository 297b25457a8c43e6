"""Frame features from a video's real action timeline, as a simulated action detector would see it.

What a frame holds: per-class detector evidence, ``(num_frames, 157)``, embedded in
``feature_dim`` dimensions through fixed random unit vectors, one per class (seeded; class
identities carry no meaning beyond being distinct), so ``features = evidence @ embeddings``.
The evidence comes from the video's annotated actions (``Charades_v1_*.csv``), degraded as a
detector would degrade them:

- ``miss_rate``: an action leaves no evidence at all;
- ``jitter``: each boundary moves by Gaussian noise, std = this fraction of the action's length;
- ``confusion``: the evidence goes to one of the class's ``confusable`` partner classes (a fixed
  seeded choice) instead of its own;
- ``false_per_minute``: spurious detections (Poisson count) of uniformly drawn classes, each lasting
  10-40 % of the video, anywhere in it;
- ``blur``: evidence rises and falls over the interval's edges along a logistic ramp of this
  scale (seconds), ``confidence * sigmoid((t - start) / blur) * sigmoid((end - t) / blur)``, with a
  per-detection ``confidence`` drawn in [``min_confidence``, 1]; overlapping detections of one
  class combine by maximum;
- ``noise``: white Gaussian noise of this std on every class's evidence in every frame.

What a frame cannot hold: the query. Nothing here reads a sentence or the Charades-STA files: every
annotated action is detected alike, queried or not, so which one a query names is known only from
its text, which the model must learn to map to the classes' embeddings from the training queries.
Nor the class names, nor the exact annotated boundaries (unless ``jitter`` and ``blur`` are 0).

Every draw is a pure function of ``(seed, the video's CSV split, video_id)`` (test videos draw from
their own seeds), and each degradation draws from its own stream, so changing one knob leaves the
others' draws as they were.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from datamodules.feature_stores import GeneratedFeatures
from datamodules.synthetic_features import stable_seed
from grounding.action_timelines import NUM_CLASSES, Timeline
from grounding.answer_format.timeline import frame_times
from grounding.checks import NON_NEGATIVE, PROBABILITY, Checked, checked, integer
from grounding.records import FeatureError

FALSE_LENGTH = (0.1, 0.4)  # spurious detections last this fraction of the video


@dataclass(frozen=True)
class ActionTraceSpec(Checked):
    """The simulated detector's degradations (module docstring); the defaults and why they were
    chosen: bench/RESULTS.md, "Charades-STA action traces"."""

    blur: float = checked(1.0, NON_NEGATIVE)
    jitter: float = checked(0.1, NON_NEGATIVE)
    miss_rate: float = checked(0.1, PROBABILITY)
    confusion: float = checked(0.1, PROBABILITY)
    confusable: int = checked(3, integer(1, NUM_CLASSES - 1))
    false_per_minute: float = checked(1.0, NON_NEGATIVE)
    min_confidence: float = checked(0.5, PROBABILITY)
    noise: float = checked(0.1, NON_NEGATIVE)


@dataclass(frozen=True)
class Detection:
    """A detector response: evidence for class ``label`` over [start, end] seconds."""

    label: int
    start: float
    end: float
    confidence: float


def _stream(seed: int, timeline: Timeline, name: str) -> np.random.Generator:
    return np.random.default_rng(stable_seed("action_trace", seed, timeline.split, timeline.video_id, name))


@lru_cache(maxsize=8)
def confusable_classes(seed: int, count: int) -> np.ndarray:
    """``(NUM_CLASSES, count)``: each class's ``count`` partner classes (distinct, never itself), fixed
    by ``seed``."""
    rng = np.random.default_rng(stable_seed("action_trace_confusable", seed))
    partners = [rng.permutation(NUM_CLASSES - 1)[:count] for _ in range(NUM_CLASSES)]
    return np.array([[p + (p >= c) for p in row] for c, row in enumerate(partners)], dtype=np.int64)


@lru_cache(maxsize=8)
def class_embeddings(seed: int, dim: int) -> np.ndarray:
    """``(NUM_CLASSES, dim)`` random unit vectors, fixed by ``seed``."""
    vectors = np.random.default_rng(stable_seed("action_trace_classes", seed)).standard_normal(
        (NUM_CLASSES, dim)
    )
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def detect(timeline: Timeline, spec: ActionTraceSpec, seed: int) -> list[Detection]:
    """What the simulated detector reports for one video: its kept actions (jittered, maybe
    relabelled) and its false detections."""
    duration, detections = timeline.duration, []
    miss, jitter, confuse, confidence = (
        _stream(seed, timeline, name) for name in ("miss", "jitter", "confuse", "confidence")
    )
    partners = confusable_classes(seed, spec.confusable)
    for action in timeline.actions:  # every draw is made, kept or not, so the streams stay aligned
        missed = miss.random() < spec.miss_rate
        shift = jitter.standard_normal(2) * spec.jitter * (action.end - action.start)
        swapped, partner = confuse.random() < spec.confusion, int(confuse.integers(spec.confusable))
        strength = _confidence(confidence.random(), spec)
        if missed:
            continue
        start, end = np.clip(np.sort(np.array([action.start, action.end]) + shift), 0.0, duration)
        label = int(partners[action.label, partner]) if swapped else action.label
        detections.append(Detection(label, float(start), float(end), strength))
    spurious = _stream(seed, timeline, "false")
    for _ in range(spurious.poisson(spec.false_per_minute * duration / 60.0)):
        length = duration * spurious.uniform(*FALSE_LENGTH)
        start = spurious.uniform(0.0, duration - length)
        label = int(spurious.integers(NUM_CLASSES))
        detections.append(Detection(label, start, start + length, _confidence(spurious.random(), spec)))
    return detections


def _confidence(unit: float, spec: ActionTraceSpec) -> float:
    return spec.min_confidence + (1.0 - spec.min_confidence) * unit


def evidence(detections: list[Detection], times: np.ndarray, blur: float) -> np.ndarray:
    """``(len(times), NUM_CLASSES)`` evidence: each detection's blurred box, by class, combined by max."""
    scores = np.zeros((len(times), NUM_CLASSES))
    for d in detections:
        if blur > 0:
            ramp = _sigmoid((times - d.start) / blur) * _sigmoid((d.end - times) / blur)
        else:
            ramp = ((times >= d.start) & (times <= d.end)).astype(float)
        scores[:, d.label] = np.maximum(scores[:, d.label], d.confidence * ramp)
    return scores


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def trace(timeline: Timeline, spec: ActionTraceSpec, seed: int, num_frames: int) -> np.ndarray:
    """``(num_frames, NUM_CLASSES)`` noisy evidence of one video at ``frame_times``."""
    times = frame_times(num_frames, timeline.duration)
    scores = evidence(detect(timeline, spec, seed), times, spec.blur)
    return scores + spec.noise * _stream(seed, timeline, "noise").standard_normal(scores.shape)


class ActionTraceFeatureStore:
    """``(num_frames, feature_dim)`` float32 features: :func:`trace` times :func:`class_embeddings`."""

    def __init__(
        self,
        timelines: Mapping[str, Timeline],
        num_frames: int = 100,
        feature_dim: int = 768,
        seed: int = 0,
        spec: ActionTraceSpec | None = None,
    ) -> None:
        self.timelines, self.num_frames, self.feature_dim = timelines, num_frames, feature_dim
        self.seed, self.spec = seed, spec or ActionTraceSpec()
        self.generated = GeneratedFeatures(self._make)

    def load(self, video_id: str) -> np.ndarray:
        return self.generated.load(video_id)

    def source(self, video_id: str) -> str:
        return f"action_trace:seed={self.seed}"

    def _make(self, video_id: str) -> np.ndarray:
        timeline = self.timelines.get(video_id)
        if timeline is None:
            raise FeatureError(
                video_id, self.source(video_id), "missing: no row with a length in Charades_v1_*.csv"
            )
        scores = trace(timeline, self.spec, self.seed, self.num_frames)
        return (scores @ class_embeddings(self.seed, self.feature_dim)).astype(np.float32)
