"""How hard are the Charades-STA action traces (``data.source.features=action_trace``) at each noise level?

A query-free reference and a simple class-aware reader put what a model does in context:

- ``best_action``: the best single action chosen without the query, at its annotated boundaries
  (grounding/metrics/action_prior.py), with three simpler query-free rules (longest, first, random)
  and the prior (best constant segment) beside it;
- ``oracle``: a reader that knows which action class the query names (the class of its annotated
  action, which the model has to infer from the sentence) and decodes that class's evidence from the
  features (projected on the class's embedding, 3-frame moving average with the end frames repeated,
  the segment maximising the sum of evidence minus half its peak). It loses what the detector lost:
  missed and relabelled actions, boundary jitter, blur, noise, false detections of the same class.
  One untuned decoder, not an upper bound: a better decoder of the same evidence scores more.
  ``experiment=charades_actions`` uses 256-d features (its ``data.source.feature_dim``).

Every degradation is scaled together (``--scales``; 1 = the defaults of ``ActionTraceSpec``) and,
at the defaults, each one doubled alone.

    python -m bench.action_trace_calibration --root ../shared/data/charades_sta
    python -m bench.action_trace_calibration --quick      # 300 test queries, two scales
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np

from bench.arguments import non_negative
from bench.figures_out import machine, print_figures
from datamodules.action_trace import ActionTraceSpec, class_embeddings, trace
from datamodules.charades_sta import CSV_NAMES, load_charades_sta
from grounding.action_timelines import Timeline, read_timelines
from grounding.answer_format.timeline import frame_times
from grounding.metrics.action_prior import best_action_scores, queried_action
from grounding.metrics.prior import prior_scores
from grounding.metrics.windows import record_iou
from grounding.records import GroundingRecord
from timerefine.pipeline.arguments import at_least_one

ROOT = Path(__file__).resolve().parents[1]
FILES = (*CSV_NAMES, "charades_sta_train.txt", "charades_sta_test.txt")  # what main() reads
DEGRADATIONS = ("jitter", "miss_rate", "confusion", "false_per_minute", "noise")


def scaled(spec: ActionTraceSpec, factor: float) -> ActionTraceSpec:
    """``spec`` with every degradation (blur kept) times ``factor``; 0 also makes confidences 1."""
    changes = {name: getattr(spec, name) * factor for name in DEGRADATIONS}
    return dataclasses.replace(spec, **changes, min_confidence=1.0 if factor == 0 else spec.min_confidence)


def decode(evidence: np.ndarray, times: np.ndarray) -> tuple[float, float]:
    """The segment maximising the sum of (smoothed evidence - half its peak)."""
    smooth = np.convolve(np.pad(evidence, 1, mode="edge"), np.ones(3) / 3, mode="valid")
    gain = smooth - 0.5 * smooth.max()
    best, total, first, segment = -np.inf, 0.0, 0, (0, 0)
    for index, value in enumerate(gain):
        total, first = (value, index) if total <= 0 else (total + value, first)
        if total > best:
            best, segment = total, (first, index)
    return float(times[segment[0]]), float(times[segment[1]])


def oracle_miou(
    records: list[GroundingRecord],
    timelines: dict[str, Timeline],
    spec: ActionTraceSpec,
    feature_dim: int,
    num_frames: int,
) -> float:
    """mIoU of the class oracle on ``records`` (queries without a matching action score 0)."""
    embeddings = class_embeddings(0, feature_dim)
    readout: dict[str, np.ndarray] = {}
    ious = []
    for record in records:
        timeline = timelines[record.video_id]
        if record.video_id not in readout:  # features of the video, read back per class
            readout[record.video_id] = trace(timeline, spec, 0, num_frames) @ embeddings @ embeddings.T
        action = queried_action(record, timeline)
        if action is None:
            ious.append(0.0)
            continue
        times = frame_times(num_frames, timeline.duration)
        ious.append(record_iou(decode(readout[record.video_id][:, action.label], times), record))
    return 100 * float(np.mean(ious))


def simple_rules(test: list[GroundingRecord], timelines: dict[str, Timeline]) -> dict[str, float]:
    """mIoU of query-free rules at annotated boundaries: the longest, the first, a random action."""
    rng = np.random.default_rng(0)
    rules = {
        "longest": lambda t: max(t.actions, key=lambda a: a.end - a.start),
        "first": lambda t: min(t.actions, key=lambda a: a.start),
        "random": lambda t: t.actions[rng.integers(len(t.actions))],
    }
    scores = {}
    for name, rule in rules.items():
        picks = [rule(timelines[r.video_id]) for r in test]
        scores[name] = 100 * float(
            np.mean([record_iou((a.start, a.end), r) for a, r in zip(picks, test, strict=True)])
        )
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=ROOT.parent / "shared" / "data" / "charades_sta")
    parser.add_argument("--scales", type=non_negative, nargs="+", default=[0.0, 0.5, 1.0, 1.5, 2.0, 3.0])
    parser.add_argument("--feature-dim", type=at_least_one, nargs="+", default=[768, 256])
    parser.add_argument("--num-frames", type=at_least_one, default=100)
    parser.add_argument("--quick", action="store_true", help="300 test queries, scales 0 and 1")
    args = parser.parse_args(argv)
    if missing := [name for name in FILES if not (args.root / name).is_file()]:
        parser.error(f"--root {args.root}: no {', '.join(missing)}")

    timelines = read_timelines(args.root / name for name in CSV_NAMES)
    train, _ = load_charades_sta(args.root, "train")
    test, _ = load_charades_sta(args.root, "test")
    scales = args.scales
    if args.quick:
        test, scales = test[:300], [0.0, 1.0]
    print(f"machine: {machine()}")
    print(f"{len(train)} train / {len(test)} test queries, {args.num_frames} frames")

    figures: dict[str, float] = {
        "prior_mIoU": prior_scores(train, test)["mIoU"],
        "best_action_mIoU": best_action_scores(train, test, timelines)["mIoU"],
    }
    figures |= {f"{name}_action_mIoU": v for name, v in simple_rules(test, timelines).items()}
    print(f"query-free at annotated boundaries (test mIoU): {figures}")

    base = ActionTraceSpec()
    print("| degradations | " + " | ".join(f"oracle mIoU, {d}-d" for d in args.feature_dim) + " |")
    print("|---|" + "---:|" * len(args.feature_dim))
    rows = {f"x{factor:g}": scaled(base, factor) for factor in scales}
    if not args.quick:
        rows |= {
            f"{name} x2": dataclasses.replace(base, **{name: 2 * getattr(base, name)})
            for name in DEGRADATIONS
        }
        rows["blur x2"] = dataclasses.replace(base, blur=2 * base.blur)
    for label, spec in rows.items():
        cells = [oracle_miou(test, timelines, spec, dim, args.num_frames) for dim in args.feature_dim]
        print(f"| {label} | " + " | ".join(f"{c:.1f}" for c in cells) + " |", flush=True)
        key = label.replace(" ", "_")
        figures |= {f"oracle_{key}_{dim}d_mIoU": c for dim, c in zip(args.feature_dim, cells, strict=True)}
    print_figures(figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
