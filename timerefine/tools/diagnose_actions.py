"""Wrong event or bad boundaries? Which annotated action each prediction of a Charades-STA run landed on.

Every Charades-STA moment is one of its video's annotated actions (``Charades_v1_*.csv``), so a
prediction either lands on the queried action (then its IoU with the truth says whether the
boundaries are good, >= 0.5, or bad), on another action of the same video (the wrong event), or on
no action at all. It lands on the action it overlaps most (IoU); an action with IoU >= 0.5 with the
truth (Charades videos annotate many near-identical intervals) is the queried one's place, not
another event, and an answer with IoU >= 0.5 with the truth (an R1@0.5 hit) is always on the right
action. For TimeRefine runs it also prints each step's mean boundary error
(timerefine/tools/diagnose_builtin.py). Then the same by the moment's length (a
share of its video): where the answers land, and how far the right-action answers' boundaries are
from the truth at each step (frame indices, coarse -> final), which shows where refinement helps.

    timerefine-diagnose-actions runs/x                      # runs/x/predictions/test.jsonl
    timerefine-diagnose-actions runs/x --predictions runs/x/eval/test/predictions/test.jsonl
    timerefine-diagnose-actions runs/x --root ../data/charades_sta   # the run's root moved, or relative
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from datamodules.charades_sta import CSV_NAMES
from grounding.action_timelines import Action, Timeline, read_timelines
from grounding.metrics.protocols import EXACT, hits
from grounding.metrics.windows import segment_iou
from timerefine.tools.diagnose_builtin import refinement_trace
from timerefine.tools.run_diagnosis import AnswerLayout, RunError, answer_layout, fail, print_report, read_run

GOOD_BOUNDARIES = 0.5  # IoU with the truth from which a prediction on the right action counts as good
RIGHT_GOOD, RIGHT_BAD = "right action, IoU >= 0.5", "right action, IoU < 0.5"
WRONG, NOTHING, UNPARSED = "another action", "no action", "unparsed"
OUTCOMES = (RIGHT_GOOD, RIGHT_BAD, WRONG, NOTHING, UNPARSED)
LENGTH_BINS = ((0.0, 0.2), (0.2, 0.4), (0.4, 1.0))  # the moment's length / its video's duration


def landing(pred: tuple[float, float] | None, truth: tuple[float, float], actions: tuple[Action, ...]) -> str:
    """The outcome of one prediction (seconds; None: unparsed) against the truth and the video's actions."""
    if pred is None:
        return UNPARSED
    if not actions:
        return NOTHING
    if hits(segment_iou(pred, truth), GOOD_BOUNDARIES, EXACT):  # as R1@0.5
        return RIGHT_GOOD
    intervals = [(a.start, a.end) for a in actions]
    landed = max(intervals, key=lambda interval: (segment_iou(pred, interval), segment_iou(interval, truth)))
    if segment_iou(pred, landed) == 0:
        return NOTHING
    return RIGHT_BAD if hits(segment_iou(landed, truth), GOOD_BOUNDARIES, EXACT) else WRONG


def diagnose(rows: list[dict], timelines: Mapping[str, Timeline]) -> dict[str, tuple[int, float]]:
    """``outcome -> (queries, their mIoU in percent)`` over prediction rows (predictions/test.jsonl)."""
    counts: Counter[str] = Counter()
    iou_sums: Counter[str] = Counter()
    for row in rows:
        outcome = _outcome(row, timelines)
        counts[outcome] += 1
        iou_sums[outcome] += row["iou"]
    return {o: (counts[o], 100 * iou_sums[o] / counts[o] if counts[o] else 0.0) for o in OUTCOMES}


def _outcome(row: dict, timelines: Mapping[str, Timeline]) -> str:
    """ValueError for a video the CSVs lack: every Charades-STA video is in them, so they are another set's."""
    if (timeline := timelines.get(row["video_id"])) is None:
        raise ValueError(f"video {row['video_id']} of a prediction is in none of the CSVs")
    pred = None if row["pred"] is None else (row["pred"][0], row["pred"][1])
    return landing(pred, (row["gt"][0], row["gt"][1]), timeline.actions)


@dataclass(frozen=True)
class LengthBin:
    """The queries whose moment fills ``low`` to ``high`` of their video: how many, their mIoU (%),
    the % landing on the queried action, and those answers' mean boundary error per step."""

    low: float
    high: float
    queries: int
    miou: float
    right_action: float
    boundary_error: tuple[float, ...]


def boundary_errors(rows: list[dict], layout: AnswerLayout) -> tuple[float, ...]:
    """Mean |boundary - truth| (frame indices of ``layout``'s timeline) of each step of the ``rows``
    that parsed into all of ``layout``'s (``steps``: coarse, then each refined answer; else the answer
    alone; when not recorded, as many as the shortest answer has); empty when none did."""
    chained = [(row.get("steps") or [row["pred"]], row) for row in rows if row["pred"] is not None]
    depth = layout.depth or min((len(chain) for chain, _ in chained), default=0)
    chained = [(chain, row) for chain, row in chained if len(chain) == depth]
    return tuple(
        sum(
            layout.frames(abs(chain[i][0] - row["gt"][0]) + abs(chain[i][1] - row["gt"][1]), row["duration"])
            for chain, row in chained
        )
        / (2 * len(chained))
        for i in range(depth if chained else 0)
    )


def by_moment_length(
    rows: list[dict], timelines: Mapping[str, Timeline], layout: AnswerLayout
) -> list[LengthBin]:
    """:class:`LengthBin` of each of ``LENGTH_BINS`` that holds a query."""
    bins = []
    for low, high in LENGTH_BINS:
        held = [r for r in rows if low < (r["gt"][1] - r["gt"][0]) / r["duration"] <= high]
        if not held:
            continue
        right = [r for r in held if _outcome(r, timelines) in (RIGHT_GOOD, RIGHT_BAD)]
        miou, share = (100 * sum(r["iou"] for r in held) / len(held), 100 * len(right) / len(held))
        bins.append(LengthBin(low, high, len(held), miou, share, boundary_errors(right, layout)))
    return bins


def print_by_length(bins: list[LengthBin]) -> None:
    print("by the moment's length (share of the video): queries, mIoU, % on the right action, and")
    print("the right-action answers' mean boundary error per step (frame indices, coarse -> final)")
    for b in bins:
        errors = " -> ".join(f"{e:.2f}" for e in b.boundary_error) or "-"
        print(
            f"  {b.low:>4.0%}-{b.high:<4.0%} {b.queries:>6} {b.miou:>6.1f} {b.right_action:>6.1f}   {errors}"
        )


def main(argv: list[str] | None = None) -> int:
    try:
        path, cfg, rows = read_run(argv, __doc__, "charades_sta", data_root=True)
    except RunError as error:
        return fail(error)
    csv_paths = [Path(cfg.data.source.root) / name for name in CSV_NAMES]
    if missing := [str(p) for p in csv_paths if not p.is_file()]:
        return fail(RunError(f"{', '.join(missing)} not found (the run's data.source.root; or give --root)"))
    try:
        timelines = read_timelines(csv_paths)
        layout = answer_layout(cfg)
        table, bins = diagnose(rows, timelines), by_moment_length(rows, timelines, layout)
    except (ValueError, KeyError) as error:  # a CSV without the actions column, rows of another run
        return fail(RunError(f"{path} with {', '.join(map(str, csv_paths))}: {error}"))
    print_report(path, rows, table, refinement_trace(rows, layout))
    print_by_length(bins)
    return 0


if __name__ == "__main__":
    sys.exit(main())
