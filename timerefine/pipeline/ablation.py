"""Aggregate finished runs of an ablation into a table and plots (pure, apart from the file writers)."""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Mapping
from pathlib import Path

from grounding.metrics.iou import THRESHOLDS

HEADLINE = (*(f"test/R1@{t}" for t in THRESHOLDS), "test/mIoU")
# Query-free references that runs report beside their test scores (metrics.json prefix -> table name).
BASELINES = {"prior": "prior (best constant segment)", "best_action": "best action without the query"}
SPREAD = "mean ± sample std (n-1) over seeds; one seed: its value"


def run_row(variant: str, seed: int, run_dir: Path) -> dict:
    """The table row of one run: its ``metrics.json`` with ``variant``, ``seed`` and ``run_dir`` (a
    string); a metrics file that is not JSON is a ValueError naming it."""
    path = run_dir / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path}: not a run's metrics ({error})") from error
    return {"variant": variant, "seed": seed, "run_dir": str(run_dir)} | metrics


def step_keys(row: dict) -> list[str]:
    keys = [k for k in row if k.startswith("test/step") and k.endswith("/mIoU")]
    return sorted(keys, key=lambda k: int(k.split("/")[1][4:]))


def _queries(runs: list[dict]) -> str:
    """The test queries scored, as one count or the range the runs span ("?": not recorded)."""
    counts = sorted({int(run["test/queries"]) for run in runs if run.get("test/queries") is not None})
    return "?" if not counts else str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"


def _coverage(runs: list[dict]) -> float | None:
    """The smallest share (%) of its test split a run scored, None where every run scored it all."""
    shares = [run["test/coverage"] for run in runs if run.get("test/coverage") is not None]
    return min(shares) if shares and min(shares) < 100.0 else None


def _mean_and_std(entry: dict, key: str, values: list[float]) -> None:
    """The mean of ``values`` and their std; one value has no spread to state, so its std is None."""
    entry[key] = statistics.fmean(values) if values else float("nan")
    entry[key + " std"] = statistics.stdev(values) if len(values) > 1 else None


def _cell(entry: dict, key: str) -> str:
    """``mean ± std``, or the value alone where one run gives no std."""
    std = entry[key + " std"]
    return f"{entry[key]:.2f}" if std is None else f"{entry[key]:.2f} ± {std:.2f}"


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and std (over seeds) of the headline metrics and of each step's mIoU, per variant; then
    the query-free baselines that every run reports (:data:`BASELINES`): one row over the seeds when
    every variant has the same baseline at a seed (the same data), else one row per variant."""
    summary = []
    variants = list(dict.fromkeys(row["variant"] for row in rows))
    for variant in variants:
        runs = [row for row in rows if row["variant"] == variant]
        entry: dict = {
            "variant": variant,
            "seeds": len(runs),
            "queries": _queries(runs),
            "coverage": _coverage(runs),
        }
        for key in (*HEADLINE, *step_keys(runs[0])):
            _mean_and_std(entry, key, [run[key] for run in runs if run.get(key) is not None])
        summary.append(entry)
    for prefix, name in BASELINES.items():
        if rows and all(f"{prefix}/mIoU" in row for row in rows):
            summary.extend(_baseline_rows(rows, prefix, name, variants))
    return summary


def _baseline_rows(rows: list[dict], prefix: str, name: str, variants: list[str]) -> list[dict]:
    """The baseline ``prefix`` over seeds (each seed once), for all variants or, where they differ at
    a seed, for each variant."""

    def scores(row: dict) -> tuple[float, ...]:
        return tuple(row[key.replace("test/", f"{prefix}/")] for key in HEADLINE)

    at_seed: dict[int, set[tuple[float, ...]]] = {}
    for row in rows:
        at_seed.setdefault(row["seed"], set()).add(scores(row))
    shared = all(len(found) == 1 for found in at_seed.values())
    groups = (
        {name: rows} if shared else {f"{name}, {v}": [r for r in rows if r["variant"] == v] for v in variants}
    )
    entries = []
    for label, group in groups.items():
        per_seed = {row["seed"]: scores(row) for row in group}
        entry = {"variant": label, "seeds": len(per_seed), "queries": _queries(group), "coverage": None}
        for i, key in enumerate(HEADLINE):
            _mean_and_std(entry, key, [values[i] for values in per_seed.values()])
        entries.append(entry)
    return entries


def markdown_table(summary: list[dict], left_out: Mapping[str, str] | None = None) -> str:
    """The table, then what its cells are, which variants scored only part of their test split, and
    the runs ``left_out`` of it (run folder -> why)."""
    lines = [
        "| variant | seeds | queries | "
        + " | ".join(k.removeprefix("test/") for k in HEADLINE)
        + " | mIoU per step (coarse -> final) |",
        "|---" * (len(HEADLINE) + 4) + "|",
    ]
    for entry in summary:
        cells = [
            entry["variant"],
            str(entry["seeds"]),
            entry["queries"],
            *(_cell(entry, k) for k in HEADLINE),
        ]
        steps = " -> ".join(
            f"{entry[k]:.1f}" for k in entry if k.startswith("test/step") and not k.endswith("std")
        )
        lines.append("| " + " | ".join(cells) + f" | {steps} |")
    lines.append(f"\nScores: {SPREAD}.")
    lines += [
        f"Partial: {e['variant']} scored {e['coverage']:.1f}% of its test split's queries (test/coverage)."
        for e in summary
        if e["coverage"] is not None
    ]
    lines += [f"Left out: {run_dir}: {why}." for run_dir, why in (left_out or {}).items()]
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: Path) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def plot(summary: list[dict], path: Path) -> None:
    """Left: final test mIoU per variant (mean ± std). Right: mIoU at each refinement step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [entry["variant"] for entry in summary]
    left.bar(
        names, [e["test/mIoU"] for e in summary], yerr=[e["test/mIoU std"] or 0.0 for e in summary], capsize=4
    )
    left.set_ylabel("test mIoU (%)")
    left.set_title("final mIoU per variant (error bars: sample std)")
    left.tick_params(axis="x", rotation=30)
    most = 0
    for entry in summary:
        keys = [k for k in entry if k.startswith("test/step") and not k.endswith("std")]
        if len(keys) > 1:
            right.plot(range(len(keys)), [entry[k] for k in keys], marker="o", label=entry["variant"])
            most = max(most, len(keys))
    right.set_xticks(range(most))
    right.set_xlabel("step (0 = first coarse segment)")
    right.set_ylabel("test mIoU (%)")
    right.set_title("progressive refinement")
    if right.lines:
        right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
