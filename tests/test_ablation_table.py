"""timerefine/pipeline/ablation.py: the ablation table, with the query-free baselines the runs report."""

from __future__ import annotations

import pytest

from timerefine.pipeline.ablation import markdown_table, summarize


def metrics(variant: str, seed: int, miou: float, **extra: float) -> dict:
    scores = {"test/R1@0.3": miou, "test/R1@0.5": miou, "test/R1@0.7": miou, "test/mIoU": miou}
    return {"variant": variant, "seed": seed, **scores, **extra}


def baselines(prior: float, best_action: float) -> dict:
    return {
        **{f"prior/{k}": prior for k in ("R1@0.3", "R1@0.5", "R1@0.7", "mIoU")},
        **{f"best_action/{k}": best_action for k in ("R1@0.3", "R1@0.5", "R1@0.7", "mIoU")},
    }


def test_the_table_ends_with_the_baselines_every_run_reports():
    rows = [
        metrics("direct", 0, 50.0, **baselines(30.0, 48.0)),
        metrics("direct", 1, 54.0, **baselines(30.0, 48.0)),
        metrics("K3", 0, 60.0, **baselines(30.0, 48.0)),
    ]
    summary = summarize(rows)
    assert [e["variant"] for e in summary] == [
        "direct",
        "K3",
        "prior (best constant segment)",
        "best action without the query",
    ]
    assert summary[0]["test/mIoU"] == 52.0 and summary[0]["test/mIoU std"] == pytest.approx(2 * 2**0.5)
    assert summary[3]["test/mIoU"] == 48.0 and summary[3]["test/mIoU std"] == 0.0
    assert "| best action without the query | 3 | 48.00 ± 0.00 |" in markdown_table(summary)


def test_a_baseline_some_runs_lack_is_left_out():
    rows = [metrics("direct", 0, 50.0, **baselines(30.0, 48.0)), metrics("direct", 1, 52.0)]
    assert [e["variant"] for e in summarize(rows)] == ["direct"]
