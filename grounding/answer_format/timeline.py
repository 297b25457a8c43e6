"""Timeline conventions: seconds <-> the frame indices 00-99 an answer writes (``data.timeline``).

Both conventions write ``NUM_BINS`` = 100 indices, 00 to 99, and differ in what index ``i`` means:

- ``uniform99`` (this project's default): ``i / 99`` of the duration, so 00 is the start and 99 the
  end of the video; a time maps to the nearest index.
- ``vtimellm100`` (VTimeLLM, TimeRefine): ``i / 100`` of the duration; a time ``t`` maps to
  ``min(round(t / d * 100), 99)``, so the last index stands for 0.99 of the video.

Under both, frame ``k`` of ``n`` shows ``k / (n - 1)`` of the video (first and last frame included),
as VTimeLLM samples ``linspace(0, T - 1, 100)``: that is where the built-in data, the synthetic
features and feature extraction put their frames, whichever timeline the answers use.

Offsets (``<OFFSET> +05 and -03``) count the same index steps as the timeline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NUM_BINS = 100
MAX_INDEX = NUM_BINS - 1


@dataclass(frozen=True)
class Timeline:
    """``span`` index steps cover the whole video: index ``i`` is ``i / span`` of the duration."""

    name: str
    span: int

    def to_index(self, seconds: float, duration: float) -> int:
        """Nearest frame index of a time, clipped to ``[0, 99]``."""
        return min(max(round(seconds / duration * self.span), 0), MAX_INDEX)

    def to_seconds(self, index: float, duration: float) -> float:
        """Time of a (possibly fractional) index, clipped to the video, ``[0, span]``: a text's
        indices stop at 99, but the aux head's fractions reach the end (index 100 of vtimellm100)."""
        return min(max(index, 0), self.span) / self.span * duration

    def to_steps(self, seconds: float, duration: float) -> int:
        """Index steps of a (non-negative) length of time, at most 99: how an offset in seconds is written."""
        return min(round(seconds / duration * self.span), MAX_INDEX)

    def frame_index(self, frame: int, num_frames: int) -> int:
        """The answer index that frame ``frame`` of ``num_frames`` shows (see :func:`frame_times`)."""
        return min(round(frame * self.span / max(num_frames - 1, 1)), MAX_INDEX)


UNIFORM99 = Timeline("uniform99", MAX_INDEX)
VTIMELLM100 = Timeline("vtimellm100", NUM_BINS)
TIMELINES = {timeline.name: timeline for timeline in (UNIFORM99, VTIMELLM100)}
DEFAULT_TIMELINE = UNIFORM99


def timeline_named(name: str) -> Timeline:
    if name not in TIMELINES:
        raise ValueError(f"unknown timeline {name!r}; choose from {', '.join(TIMELINES)}")
    return TIMELINES[name]


def frame_times(num_frames: int, duration: float) -> np.ndarray:
    """The time each of ``num_frames`` feature rows shows: ``k / (n - 1)`` of the duration."""
    return np.linspace(0.0, duration, num_frames)


def sample_frame_indices(total: int, num_frames: int) -> np.ndarray:
    """Which of a video's ``total`` frames to encode: ``linspace(0, total - 1, n)`` truncated, as
    VTimeLLM's extractor does (frames repeat when ``total < n``)."""
    if total <= 0 or num_frames <= 0:
        raise ValueError(f"need total > 0 and n > 0 frames, got total={total}, n={num_frames}")
    return np.linspace(0, total - 1, num_frames).astype(np.int64)
