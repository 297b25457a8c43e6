"""The query-free baselines a test is reported beside: ``prior/*`` (the best constant segment) and, on
Charades-STA action traces, ``best_action/*`` (the best action chosen without the query)."""

from __future__ import annotations

import lightning as L
from omegaconf import DictConfig

from callbacks.predictions_writer import PredictionsWriter
from datamodules.datamodule import GroundingDataModule
from grounding.metrics.action_prior import best_action_scores
from grounding.metrics.prior import prior_scores
from grounding.metrics.protocols import protocol_named


def baseline_scores(cfg: DictConfig, trainer: L.Trainer, datamodule: GroundingDataModule) -> dict[str, float]:
    """``prior/*`` and ``best_action/*`` (where the source has the videos' action timelines), fitted on
    the training annotations and scored on the queries the last ``trainer.test`` scored (those
    :class:`PredictionsWriter` gathered: fewer with ``trainer.limit_test_batches``) under
    ``cfg.eval.protocol``, as the model's test was: train.py and evaluate.py report the same numbers
    for the same queries."""
    tested = next(c for c in trainer.callbacks if isinstance(c, PredictionsWriter)).qids
    train = datamodule.source.annotations("train")  # not their features: a new test set needs none
    test = [r for r in datamodule.records("test") if r.qid in tested]
    protocol = protocol_named(cfg.eval.protocol)
    metrics = {f"prior/{k}": v for k, v in prior_scores(train, test, protocol).items()}
    if timelines := getattr(datamodule.source, "baseline_timelines", None):  # Charades action traces
        best_action = best_action_scores(train, test, timelines, protocol)
        metrics |= {f"best_action/{k}": v for k, v in best_action.items()}
    return metrics
