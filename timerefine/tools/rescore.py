"""Re-score a saved ``predictions/*.jsonl`` under a scoring protocol, without a model.

    timerefine-rescore runs/x/predictions/test.jsonl --protocol vtimellm [--multi-window union]

Prints one JSON object: ``R1@0.3``, ``R1@0.5``, ``R1@0.7``, ``mIoU`` (percent), ``queries``,
``parse_fail`` (percent), ``pred_reordered``, ``pred_clipped``, ``multi_window`` and ``protocol``.
Each row needs ``pred`` ([start, end] seconds, or null when the answer did not parse; an aux-head
answer to a text that did not parse has ``steps: []`` and counts in ``parse_fail`` too), ``gt``
([start, end] seconds) and ``duration``; a query with several ground-truth windows has ``windows`` and
the rule that scores them, ``multi_window`` (``best`` or ``union``; ``--multi-window`` overrides it).

Rows are scored as the run scores its own answers (the same metric, grounding/metrics/): a
prediction with start > end is reordered and one outside ``[0, duration]`` clipped, as a run does to
what it parses with ``model.inference.order_and_clip=true`` (the default), and both are counted and
reported. Ground truth outside that rule, a segment or duration that is not finite numbers, and a qid
scored twice are refused (file:line, exit 2).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from grounding.metrics.grounding import GroundingMetric
from grounding.metrics.iou import THRESHOLDS
from grounding.metrics.protocols import PROTOCOLS, Protocol
from grounding.metrics.windows import MULTI_WINDOW_MODES, Segment, metric_inputs
from grounding.records import GroundingRecord
from grounding.text_files import json_object_lines
from timerefine.pipeline.arguments import OneLineParser


class PredictionsError(ValueError):
    """A predictions file that cannot be scored; the message names the file and line."""


def finite_number(value: object) -> bool:
    """A JSON number (not a bool, a string or NaN/Infinity)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def segment(values: object, what: str, where: str) -> Segment:
    """``[start, end]``: a list of two finite numbers, or a PredictionsError naming ``where``."""
    if not isinstance(values, (list, tuple)) or len(values) != 2 or not all(map(finite_number, values)):
        raise PredictionsError(
            f"{where}: {what} must be [start, end], two finite numbers, got {json.dumps(values)}"
        )
    return float(values[0]), float(values[1])


def ordered_clipped(pred: Segment, duration: float) -> tuple[Segment, bool, bool]:
    """``pred`` ordered and inside ``[0, duration]`` as the run's answers are, and whether it was
    reordered and whether clipped (a NaN segment, an unparsed answer, stays as it is)."""
    start, end = pred
    if math.isnan(start) or math.isnan(end):
        return pred, False, False
    reordered = start > end
    start, end = sorted(pred)
    clipped = start < 0 or end > duration
    return (min(max(start, 0.0), duration), min(max(end, 0.0), duration)), reordered, clipped


def row_record(row: dict, where: str, multi_window: str | None) -> GroundingRecord:
    """The row's ground truth as the run's record of it: target window, windows and their rule."""
    if "gt" not in row or "duration" not in row:
        raise PredictionsError(f"{where}: needs pred, gt and duration")
    gt, duration = segment(row["gt"], "gt", where), row["duration"]
    if not finite_number(duration) or not duration > 0:
        raise PredictionsError(f"{where}: duration must be a finite number > 0, got {json.dumps(duration)}")
    windows = [segment(w, "each of windows", where) for w in row.get("windows") or [gt]]
    for start, end in (gt, *windows):
        if not 0 <= start < end <= duration:  # zero length too: the datasets' quirk (drop or error)
            raise PredictionsError(
                f"{where}: ground truth [{start}, {end}] is not a segment of positive length inside [0, {duration}]"
            )
    if len(windows) == 1 and windows[0] != gt:  # the IoU would be the prediction's with gt
        raise PredictionsError(
            f"{where}: gt {list(gt)} is not the query's one window {list(windows[0])}, which scores it"
        )
    mode = multi_window or row.get("multi_window")
    if (mode is None and len(windows) > 1) or (mode is not None and mode not in MULTI_WINDOW_MODES):
        raise PredictionsError(
            f"{where}: the rule of a query's several windows, multi_window, must be best or union "
            f"(got {mode!r}); pass --multi-window best|union"
        )
    qid = str(row.get("qid", where))
    return GroundingRecord(qid, "", "", duration, *gt, tuple(windows), mode or "best")


def read_predictions(
    path: Path, multi_window: str | None = None
) -> tuple[list[Segment], list[GroundingRecord], list[bool], int, int]:
    """Each row's prediction (ordered and clipped; NaN when none), record and whether its text did not
    parse (no prediction, or ``steps: []`` beside the aux head's), and how many predictions were
    reordered and clipped."""
    segments, records, unparsed, reordered, clipped = [], [], [], 0, 0
    lines_of: dict[str, int] = {}  # qid -> the line that scored it
    try:
        rows = list(json_object_lines(path))
    except OSError as error:
        raise PredictionsError(f"{path}: {error.strerror or error}") from error
    except ValueError as error:  # names the line
        raise PredictionsError(str(error)) from error
    for number, row in rows:
        where = f"{path}:{number}"
        if "pred" not in row:
            raise PredictionsError(f"{where}: needs pred, gt and duration")
        records.append(row_record(row, where, multi_window))
        if (first := lines_of.setdefault(records[-1].qid, number)) != number:
            raise PredictionsError(f"{where}: qid {records[-1].qid} is scored on line {first} already")
        pred = (math.nan, math.nan) if row["pred"] is None else segment(row["pred"], "pred", where)
        pred, was_reordered, was_clipped = ordered_clipped(pred, records[-1].duration)
        segments.append(pred)
        unparsed.append(row["pred"] is None or row.get("steps") == [])
        reordered, clipped = reordered + was_reordered, clipped + was_clipped
    if not records:
        raise PredictionsError(f"{path}: no prediction rows")
    return segments, records, unparsed, reordered, clipped


def rescore(path: Path, protocol: Protocol, multi_window: str | None = None) -> dict[str, float | str | None]:
    """The headline scores of the predictions in ``path`` under ``protocol``, by the run's metric;
    ``multi_window`` overrides the rule each row records for its windows."""
    segments, records, unparsed, reordered, clipped = read_predictions(path, multi_window)
    metric = GroundingMetric(protocol=protocol)
    metric.update(*metric_inputs(segments, records), unparsed=torch.tensor(unparsed))
    scores = metric.compute()
    modes = sorted({r.multi_window for r in records if len(r.windows) > 1})
    return {
        **{f"R1@{t}": scores[f"R1@{t}"] for t in THRESHOLDS},
        "mIoU": scores["mIoU"],
        "queries": int(scores["count"]),
        "parse_fail": scores["parse_fail"],
        "pred_reordered": reordered,
        "pred_clipped": clipped,
        "multi_window": ",".join(modes) or None,
        "protocol": protocol.name,
    }


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("predictions", type=Path, help="a predictions/*.jsonl file of a run")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="exact")
    parser.add_argument(
        "--multi-window", choices=MULTI_WINDOW_MODES, help="default: the rule each row records"
    )
    args = parser.parse_args(argv)
    protocol = PROTOCOLS[args.protocol]
    try:
        scores = rescore(args.predictions, protocol, args.multi_window)
    except PredictionsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if protocol.warning:
        print(f"warning: {protocol.warning}", file=sys.stderr)
    if scores["pred_reordered"] or scores["pred_clipped"]:
        print(
            f"warning: {scores['pred_reordered']} predictions had start > end (scored reordered) and "
            f"{scores['pred_clipped']} lay outside [0, duration] (scored clipped), as a run scores its "
            "own answers with model.inference.order_and_clip=true (the default)",
            file=sys.stderr,
        )
    print(json.dumps(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
