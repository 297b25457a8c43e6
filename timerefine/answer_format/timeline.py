"""Seconds <-> frame-index conversion on the uniform grid of ``NUM_BINS`` frame indices (00-99).

Index ``i`` stands for time ``i / (NUM_BINS - 1) * duration``: 00 is the first frame, 99 the last.
"""

from __future__ import annotations

NUM_BINS = 100
MAX_INDEX = NUM_BINS - 1


def to_index(seconds: float, duration: float) -> int:
    """Nearest frame index of a time, clipped to ``[0, 99]``."""
    return min(max(round(seconds / duration * MAX_INDEX), 0), MAX_INDEX)


def to_seconds(index: float, duration: float) -> float:
    """Time of a (possibly fractional) frame index."""
    return min(max(index, 0), MAX_INDEX) / MAX_INDEX * duration
