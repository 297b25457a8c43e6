"""IoU of one predicted segment with a query's several ground-truth windows, and the window to train on.

``best`` (Lighthouse, QVHighlights): the IoU with the best-matching window. ``union`` (UniTime): the
IoU with the windows' union as a set of moments, |pred ∩ U| / |pred ∪ U|. With one window both are
the plain temporal IoU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from grounding.records import GroundingRecord

MULTI_WINDOW_MODES = ("best", "union")
Segment = tuple[float, float]


def merged(windows: Sequence[Segment]) -> list[Segment]:
    """The windows' union as sorted disjoint segments (touching ones joined)."""
    joined: list[Segment] = []
    for start, end in sorted(windows):
        if joined and start <= joined[-1][1]:
            joined[-1] = (joined[-1][0], max(joined[-1][1], end))
        else:
            joined.append((start, end))
    return joined


def overlap(a: Segment, b: Segment) -> float:
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


def segment_iou(a: Segment, b: Segment) -> float:
    """:func:`grounding.metrics.iou.temporal_iou` of two segments, in plain floats."""
    span = max(a[1], b[1]) - min(a[0], b[0])
    if span <= 0:
        return 1.0 if tuple(a) == tuple(b) else 0.0
    return overlap(a, b) / span


def multi_window_iou(pred: Segment, windows: Sequence[Segment], mode: str) -> float:
    """IoU of ``pred`` (start <= end, NaN when unparsed: 0) with ``windows`` under ``mode``.

    As in :func:`temporal_iou`, a point prediction equal to a point window scores 1.
    """
    if mode not in MULTI_WINDOW_MODES:
        raise ValueError(f"multi_window must be one of {MULTI_WINDOW_MODES}, got {mode!r}")
    if not windows:
        raise ValueError("a query needs at least one window")
    if any(math.isnan(x) for x in pred):
        return 0.0
    if mode == "best":
        return max(segment_iou(pred, window) for window in windows)
    union = merged(windows)
    inter = sum(overlap(pred, window) for window in union)
    size = (pred[1] - pred[0]) + sum(end - start for start, end in union) - inter
    if size <= 0:
        return 1.0 if tuple(pred) in {tuple(w) for w in windows} else 0.0
    return inter / size


def target_window(windows: Sequence[Segment], mode: str) -> Segment:
    """The one segment a single-answer model is trained on: of the windows and their span, the one
    that ``mode`` scores highest, the first on ties. Under ``best`` that is the first window (every
    window scores 1); under ``union`` whichever of them covers the union best."""
    span = (min(s for s, _ in windows), max(e for _, e in windows))
    candidates = [*windows, span]
    scores = [multi_window_iou(candidate, windows, mode) for candidate in candidates]
    return tuple(candidates[scores.index(max(scores))])


def record_iou(pred: Segment, record: GroundingRecord) -> float:
    """IoU of ``pred`` (seconds) with the record's window, or its windows by its ``multi_window`` rule."""
    return multi_window_iou(pred, record.windows, record.multi_window)


def metric_inputs(
    segments: Sequence[Segment], records: Sequence[GroundingRecord]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(pred, target, duration, iou)`` for :meth:`GroundingMetric.update`: the predicted segments
    (seconds, NaN when unparsed), the records' target segments, their durations, and, when a query
    has several windows, each prediction's :func:`record_iou` (else None: the protocol computes it)."""
    pred = torch.tensor(segments, dtype=torch.float64)
    target = torch.tensor([[r.start, r.end] for r in records], dtype=torch.float64)
    duration = torch.tensor([r.duration for r in records], dtype=torch.float64)
    if all(len(r.windows) == 1 for r in records):
        return pred, target, duration, None
    iou = torch.tensor(
        [record_iou(p, r) for p, r in zip(segments, records, strict=True)], dtype=torch.float64
    )
    return pred, target, duration, iou
