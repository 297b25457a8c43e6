"""Re-score a saved ``predictions/*.jsonl`` under a scoring protocol, without a model.

    timerefine-rescore runs/x/predictions/test.jsonl --protocol vtimellm

Prints one JSON object: ``R1@0.3``, ``R1@0.5``, ``R1@0.7``, ``mIoU`` (percent), ``queries``,
``parse_fail`` (percent) and ``protocol``. Each row needs ``pred`` ([start, end] seconds, or null
when the answer did not parse), ``gt`` ([start, end] seconds) and ``duration``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from grounding.metrics.iou import THRESHOLDS
from grounding.metrics.protocols import PROTOCOLS, Protocol, protocol_scores, protocol_sums


class PredictionsError(ValueError):
    """A predictions file that cannot be scored; the message names the file and line."""


def _row_times(row: dict, where: str) -> tuple[list[float], list[float], float]:
    try:
        pred = [math.nan, math.nan] if row["pred"] is None else [float(x) for x in row["pred"]]
        gt, duration = [float(x) for x in row["gt"]], float(row["duration"])
    except (KeyError, TypeError, ValueError) as error:
        message = f"{where}: needs pred, gt and duration ({type(error).__name__}: {error})"
        raise PredictionsError(message) from error
    if len(pred) != 2 or len(gt) != 2 or not duration > 0:
        raise PredictionsError(f"{where}: pred and gt must be [start, end] and duration > 0")
    return pred, gt, duration


def read_predictions(path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(pred, gt, duration)`` tensors of a predictions file; unparsed answers are NaN rows."""
    preds, gts, durations = [], [], []
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise PredictionsError(f"{path}: {error.strerror or error}") from error
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise PredictionsError(f"{path}:{number}: not JSON ({error.msg})") from error
        pred, gt, duration = _row_times(row, f"{path}:{number}")
        preds.append(pred)
        gts.append(gt)
        durations.append(duration)
    if not preds:
        raise PredictionsError(f"{path}: no prediction rows")
    pred, gt, duration = (torch.tensor(values, dtype=torch.float64) for values in (preds, gts, durations))
    return pred, gt, duration


def rescore(path: Path, protocol: Protocol) -> dict[str, float | str]:
    """The headline scores of the predictions in ``path`` under ``protocol``."""
    pred, gt, duration = read_predictions(path)
    scores = protocol_scores(protocol_sums(pred, gt, duration, protocol), protocol)
    return {
        **{f"R1@{t}": scores[f"R1@{t}"] for t in THRESHOLDS},
        "mIoU": scores["mIoU"],
        "queries": int(scores["count"]),
        "parse_fail": scores["parse_fail"],
        "protocol": protocol.name,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("predictions", type=Path, help="a predictions/*.jsonl file of a run")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="exact")
    args = parser.parse_args(argv)
    protocol = PROTOCOLS[args.protocol]
    try:
        scores = rescore(args.predictions, protocol)
    except PredictionsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if protocol.warning:
        print(f"warning: {protocol.warning}", file=sys.stderr)
    print(json.dumps(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
