"""timerefine/pipeline/ablation.py: the ablation table, with the query-free baselines the runs report."""

from __future__ import annotations

import pytest

from timerefine.pipeline.ablation import markdown_table, plot, run_row, summarize


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
    # before: "3" seeds, the one seed-0 value counted once per variant
    assert "| best action without the query | 2 | ? | 48.00 ± 0.00 |" in markdown_table(summary)


def test_variants_on_other_data_get_their_own_baseline():
    """Before: one prior row averaged the priors of variants trained and tested on other data."""
    rows = [
        metrics("short", 0, 50.0, **baselines(30.0, 48.0)),
        metrics("short", 1, 54.0, **baselines(32.0, 48.0)),
        metrics("long", 0, 60.0, **baselines(40.0, 48.0)),
    ]
    summary = summarize(rows)
    assert [(e["variant"], e["seeds"], e["test/mIoU"]) for e in summary[2:]] == [
        ("prior (best constant segment), short", 2, 31.0),
        ("prior (best constant segment), long", 1, 40.0),
        ("best action without the query", 2, 48.0),
    ]


def test_a_variant_run_once_states_no_spread():
    """One seed has no std: the table shows the value alone, not a misleading ``± 0.00``."""
    summary = summarize([metrics("K2", 0, 50.76), metrics("K3", 0, 50.0), metrics("K3", 1, 52.0)])
    assert summary[0]["test/mIoU std"] is None
    table = markdown_table(summary)
    assert "| K2 | 1 | ? | 50.76 | 50.76 | 50.76 | 50.76 |" in table
    assert "| K3 | 2 | ? | 51.00 ± 1.41 |" in table


def test_the_table_says_what_its_spread_is_and_how_many_queries_were_scored():
    """Before (review): no word that ± is the sample std (n-1), and a run that scored 2 of its 8 test
    queries (trainer.limit_test_batches) stood in the table as a full evaluation."""
    full, part = {"test/queries": 8.0, "test/coverage": 100.0}, {"test/queries": 2.0, "test/coverage": 25.0}
    summary = summarize(
        [metrics("A", 0, 37.5, **full), metrics("A", 1, 25.0, **full), metrics("B", 0, 9.0, **part)]
    )
    table = markdown_table(summary)
    assert "| A | 2 | 8 | 31.25 ± 8.84 |" in table  # statistics.stdev: n-1
    assert "Scores: mean ± sample std (n-1) over seeds" in table
    assert "Partial: B scored 25.0% of its test split's queries (test/coverage)." in table
    assert "Partial: A" not in table
    mixed = summarize([metrics("C", 0, 1.0, **full), metrics("C", 1, 1.0, **part)])
    assert "| C | 2 | 2-8 |" in markdown_table(mixed)


def test_a_baseline_some_runs_lack_is_left_out():
    rows = [metrics("direct", 0, 50.0, **baselines(30.0, 48.0)), metrics("direct", 1, 52.0)]
    assert [e["variant"] for e in summarize(rows)] == ["direct"]


def test_the_step_axis_spans_the_longest_chain(tmp_path, monkeypatch):
    """A K=3 variant (5 steps) plotted before a K=1 one (3 steps) keeps ticks 0-4."""
    import matplotlib.pyplot as plt

    closed = []
    monkeypatch.setattr(plt, "close", closed.append)
    k3 = {
        "variant": "K3",
        "test/mIoU": 50.0,
        "test/mIoU std": 0.0,
        **{f"test/step{i}/mIoU": 50.0 for i in range(5)},
    }
    k1 = {
        "variant": "K1",
        "test/mIoU": 50.0,
        "test/mIoU std": 0.0,
        **{f"test/step{i}/mIoU": 50.0 for i in range(3)},
    }
    plot([k3, k1], tmp_path / "results.png")
    assert list(closed[0].axes[1].get_xticks()) == [0, 1, 2, 3, 4]


def test_a_metrics_file_that_is_not_json_is_named(tmp_path):
    (tmp_path / "metrics.json").write_text('{"test/mIoU": 50.0}')
    assert run_row("K3", 12, tmp_path) == {
        "variant": "K3",
        "seed": 12,
        "run_dir": str(tmp_path),
        "test/mIoU": 50.0,
    }
    (tmp_path / "metrics.json").write_text("{trunc")
    with pytest.raises(ValueError, match=f"^{tmp_path / 'metrics.json'}: not a run's metrics"):
        run_row("K3", 12, tmp_path)
