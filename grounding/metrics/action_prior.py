"""The best single action interval chosen without the query (Charades-STA), fitted on train, scored on test.

Every Charades-STA moment is one of its video's annotated actions (``Charades_v1_*.csv``). A
query-free rule can only pick the same action for every query of a video. The rule here: the
action whose class train queries name most often per occurrence (:func:`queried_class_rates`;
ties: the longer one), at its annotated boundaries. Among the simple rules it scores best on train
(bench/RESULTS.md lists the others: longest, first, random), so a model that beats it by more than
noise without the query has found the answer somewhere it should not have.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from grounding.action_timelines import Action, Timeline
from grounding.metrics.grounding import segment_scores
from grounding.metrics.protocols import EXACT, Protocol
from grounding.metrics.windows import segment_iou
from grounding.records import GroundingRecord


def queried_action(record: GroundingRecord, timeline: Timeline) -> Action | None:
    """The annotated action whose interval matches the query's segment best (None: no overlap)."""
    ious = [segment_iou((record.start, record.end), (a.start, a.end)) for a in timeline.actions]
    best = max(range(len(ious)), key=ious.__getitem__, default=None)
    return None if best is None or ious[best] == 0 else timeline.actions[best]


def queried_class_rates(train: list[GroundingRecord], timelines: Mapping[str, Timeline]) -> dict[int, float]:
    """Per class: train queries naming an action of that class / its actions in the queried videos."""
    videos = {r.video_id for r in train if r.video_id in timelines}
    present = Counter(a.label for v in videos for a in timelines[v].actions)
    named = Counter(
        action.label
        for r in train
        if r.video_id in timelines and (action := queried_action(r, timelines[r.video_id])) is not None
    )
    return {label: named[label] / count for label, count in present.items()}


def pick_action(timeline: Timeline, rates: Mapping[int, float]) -> Action | None:
    """The video's action of the most often named class (ties: the longer); None without actions."""
    return max(timeline.actions, key=lambda a: (rates.get(a.label, 0.0), a.end - a.start), default=None)


def best_action_scores(
    train: list[GroundingRecord],
    test: list[GroundingRecord],
    timelines: Mapping[str, Timeline],
    protocol: Protocol = EXACT,
) -> dict[str, float]:
    """R1@m and mIoU of :func:`pick_action` (rates from ``train``) on ``test`` under ``protocol``; a
    video without a timeline or actions answers the empty segment at 0, which scores 0."""
    rates = queried_class_rates(train, timelines)
    segments = []
    for record in test:
        timeline = timelines.get(record.video_id)
        action = pick_action(timeline, rates) if timeline is not None else None
        segments.append((0.0, 0.0) if action is None else (action.start, action.end))
    return segment_scores(segments, test, protocol)
