"""Which event did each prediction land on? Splits a built-in run's errors into reading the query
(landing on the queried event rather than a distractor) and finding its boundaries. For TimeRefine
runs it also traces the steps: the mean boundary error of each step's answer, and how many final
answers differ from the first refined one.

    timerefine-diagnose-builtin runs/x                      # runs/x/predictions/test.jsonl
    timerefine-diagnose-builtin runs/x --predictions runs/x/eval/aux/predictions/test.jsonl
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from omegaconf import OmegaConf

from datamodules.builtin import BuiltinEvent, BuiltinSpec, make_sample
from grounding.metrics.windows import segment_iou
from timerefine.tools.run_diagnosis import AnswerLayout, RunError, answer_layout, fail, print_report, read_run

ROOT = Path(__file__).resolve().parents[2]

OUTCOMES = (
    "queried",
    "distractor: same verb",
    "distractor: same object",
    "distractor: other",
    "nothing",
    "unparsed",
)


def landing(pred: list[float] | None, events: tuple[BuiltinEvent, ...], queried: int = 0) -> str:
    """The outcome of one prediction: the event it overlaps most; ``events[queried]`` is the queried one."""
    events = (events[queried], *events[:queried], *events[queried + 1 :])
    if pred is None:
        return "unparsed"
    ious = [segment_iou((pred[0], pred[1]), (e.start, e.end)) for e in events]
    best = max(range(len(events)), key=ious.__getitem__)
    if ious[best] == 0:
        return "nothing"
    if best == 0:
        return "queried"
    queried, hit = events[0], events[best]
    if hit.verb == queried.verb:
        return "distractor: same verb"
    return "distractor: same object" if hit.obj == queried.obj else "distractor: other"


def diagnose(rows: list[dict], spec: BuiltinSpec) -> dict[str, tuple[int, float]]:
    """``outcome -> (queries, mean IoU with the ground truth in percent)``."""
    counts: Counter[str] = Counter()
    iou_sums: Counter[str] = Counter()
    for row in rows:
        _, split, video, *event = row["qid"].split(":")  # builtin:<split>:<video>[:<event>]
        events, queried = make_sample(spec, split, int(video)).events, int(event[0]) if event else 0
        truth = (events[queried].start, events[queried].end)
        if max(abs(a - b) for a, b in zip(row["gt"], truth, strict=True)) > 1e-3:
            raise ValueError(
                f"{row['qid']} has the moment {row['gt']} there, {list(truth)} in this run's data"
            )
        outcome = landing(row["pred"], events, queried)
        counts[outcome] += 1
        iou_sums[outcome] += row["iou"]
    return {o: (counts[o], 100 * iou_sums[o] / counts[o] if counts[o] else 0.0) for o in OUTCOMES}


def refinement_trace(rows: list[dict], layout: AnswerLayout) -> tuple[list[float], float] | None:
    """Over the rows that parsed into every step of ``layout`` (coarse, then each refined answer; when
    not recorded, the most any row has): the mean |boundary - truth| in frame indices per step, and the
    % of final answers a frame or more away from the first refined one. None without refinement steps
    (direct answers) or without a row that parsed into all."""
    depth = layout.depth or max((len(row.get("steps") or []) for row in rows), default=0)
    traced = [row for row in rows if len(row.get("steps") or []) == depth]
    if depth < 2 or not traced:
        return None
    frames = [
        [[layout.frames(t, row["duration"]) for t in segment] for segment in (*row["steps"], row["gt"])]
        for row in traced
    ]
    errors = [
        sum(abs(f[i][0] - f[-1][0]) + abs(f[i][1] - f[-1][1]) for f in frames) / (2 * len(frames))
        for i in range(depth)
    ]
    moved = sum(max(abs(f[depth - 1][0] - f[1][0]), abs(f[depth - 1][1] - f[1][1])) >= 1 for f in frames)
    return errors, 100 * moved / len(frames)


def main(argv: list[str] | None = None) -> int:
    try:
        path, cfg, rows = read_run(argv, __doc__, "builtin")
    except RunError as error:
        return fail(error)
    try:
        table = diagnose(rows, BuiltinSpec(**OmegaConf.to_container(cfg.data.source)))
    except (ValueError, KeyError) as error:  # rows of another run's predictions
        return fail(RunError(f"{path}: not the test predictions of this built-in run ({error})"))
    print_report(path, rows, table, refinement_trace(rows, answer_layout(cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
