"""Leak checks of the Charades-STA action traces, with small real trainings (``features=action_trace``).

(a) Trained and tested with empty queries, a model cannot beat the best single action chosen without
the query (grounding/metrics/action_prior.py) by more than noise, and stays below the same model
trained with its queries: nothing reaching the model tells it the answer as plainly as the query
does. At this budget the model with its queries is itself below that best action, so the first
bound alone would pass features that gave the query away; the second is what catches that.
(tests/test_action_trace.py shows the features unchanged when queries are reworded or dropped.)
(b) A model trained with the queries, tested with each test query moved to another video, drops to
the prior (the best constant segment): its score came from reading the query. All compare on the
same test queries; the numbers are in bench/RESULTS.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datamodules.charades_sta import CSV_NAMES, load_charades_sta
from grounding.action_timelines import read_timelines
from grounding.metrics.action_prior import best_action_scores
from grounding.metrics.prior import prior_scores
from tests import launched

ROOT = Path(__file__).resolve().parents[1]
CHARADES = ROOT.parent / "shared" / "data" / "charades_sta"
pytestmark = [
    pytest.mark.slow,  # two 600-step runs on real data: 231 s together alone on 2 cores of an Intel Xeon
    pytest.mark.timeout(2400),  # its first test trains one of them: 630 s on an AVX2-only EPYC in CI
    pytest.mark.real_data,
    pytest.mark.skipif(not (CHARADES / "charades_sta_test.txt").is_file(), reason=f"absent: {CHARADES}"),
]
TEST_QUERIES = 1000  # the first 1,000 test queries: a standard error of about 1.2 mIoU
NOISE = 3.0  # mIoU points: about 2.5 standard errors of a 1,000-query mean
SMALL = [
    "experiment=charades_actions",
    "model=direct",
    "model.saliency.projector_steps=0",  # as the numbers in bench/RESULTS.md were measured
    "trainer.max_steps=600",
    "trainer.val_check_interval=600",
    "trainer.limit_val_batches=1",
    f"trainer.limit_test_batches={TEST_QUERIES // 100}",
    "callbacks.progress_bar=none",
    "callbacks.refinement_trace=0",
    "logger.tensorboard=false",
]


def run(script: str, *args: str) -> None:
    result = launched.run([script, *args], timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]


def scores(predictions: Path) -> dict[str, float]:
    """mIoU of the predictions (``model``), and of the prior and the best query-free action on the
    same test queries."""
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    train, _ = load_charades_sta(CHARADES, "train")
    test, _ = load_charades_sta(CHARADES, "test")
    evaluated = {row["qid"] for row in rows}
    assert len(evaluated) == len(rows) == TEST_QUERIES
    test = [r for r in test if r.qid in evaluated]
    timelines = read_timelines(CHARADES / name for name in CSV_NAMES)
    return {
        "model": 100 * sum(row["iou"] for row in rows) / len(rows),
        "prior": prior_scores(train, test)["mIoU"],
        "best_action": best_action_scores(train, test, timelines)["mIoU"],
    }


@pytest.fixture(scope="module")
def reading_run(tmp_path_factory) -> Path:
    """A small direct model trained with the queries."""
    output_dir = tmp_path_factory.mktemp("action_trace") / "queries"
    run("train.py", *SMALL, f"output_dir={output_dir}")
    return output_dir


def test_without_the_query_no_model_beats_the_best_action(tmp_path, reading_run):
    output_dir = tmp_path / "empty"
    run("train.py", *SMALL, "data.source.queries=empty", f"output_dir={output_dir}")
    blind = scores(output_dir / "predictions" / "test.jsonl")
    reading = scores(reading_run / "predictions" / "test.jsonl")
    assert blind["model"] <= blind["best_action"] + NOISE, blind
    assert blind["model"] < reading["model"] - NOISE, (blind, reading)  # what the query gives, it lacks


def test_shuffled_queries_drop_a_trained_model_to_the_prior(reading_run):
    reading = scores(reading_run / "predictions" / "test.jsonl")
    run("evaluate.py", str(reading_run), "--name", "shuffled", "data.source.queries=shuffled")
    shuffled = scores(reading_run / "eval" / "shuffled" / "predictions" / "test.jsonl")
    assert reading["model"] - shuffled["model"] > 2 * NOISE, (reading, shuffled)  # it read the query
    assert shuffled["model"] <= shuffled["prior"] + NOISE, shuffled
