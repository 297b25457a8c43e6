"""The unit every dataset produces: one query about one video, and the feature-store contract."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class GroundingRecord:
    """One text query grounded in one video; times are seconds within ``[0, duration]``.

    ``start``/``end`` is the segment the targets use. ``windows`` are all the query's ground-truth
    windows (default: that one segment); with several, predictions are scored by ``multi_window``
    (``best`` or ``union``, grounding/metrics/windows.py). ``where``: the annotation's ``file:line``
    (empty for generated data), for messages about the query.
    """

    qid: str
    video_id: str
    query: str
    duration: float
    start: float
    end: float
    windows: tuple[tuple[float, float], ...] = ()
    multi_window: str = "best"
    where: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.duration > 0:
            raise ValueError(f"{self.qid}: duration must be > 0, got {self.duration}")
        if not self.windows:
            object.__setattr__(self, "windows", ((self.start, self.end),))
        for start, end in ((self.start, self.end), *self.windows):
            if not 0 <= start <= end <= self.duration:
                raise ValueError(f"{self.qid}: segment [{start}, {end}] is not inside [0, {self.duration}]")


class FeatureError(Exception):
    """A video's features are missing or unusable; the message names the video and the file."""

    def __init__(self, video_id: str, path: str, reason: str) -> None:
        super().__init__(f"features of video '{video_id}' ({path}): {reason}")
        self.video_id, self.path, self.reason = video_id, path, reason


class EmptySplitError(ValueError):
    """A split with no usable query; the message names the split and says why."""


class FeatureStore(Protocol):
    """Maps a video id to a float32 array of shape ``(num_frames, feature_dim)``.

    Implementations raise :class:`FeatureError` for anything missing or malformed.
    """

    num_frames: int
    feature_dim: int

    def load(self, video_id: str) -> np.ndarray: ...

    def source(self, video_id: str) -> str:
        """Where ``video_id``'s features come from (its file, or what makes them), as errors name it."""
        ...


def resample_frames(features: np.ndarray, num_frames: int) -> np.ndarray:
    """Pick ``num_frames`` uniformly spaced rows (nearest) from a ``(T, D)`` array of any length T."""
    if features.shape[0] == num_frames:
        return features
    index = np.linspace(0, features.shape[0] - 1, num_frames).round().astype(np.int64)
    return features[index]
