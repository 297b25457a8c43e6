"""On-policy refinement gives the same run whatever ``data.num_workers``: the guesses refreshed in the
main process reach the targets of the very next batch, also when workers load the items."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

import train
from tests import launched
from tests.test_build import tiny_build_overrides
from timerefine.pipeline.build import build_datamodule
from timerefine.pipeline.config import load_config

ENV = dict(os.environ, OMP_NUM_THREADS="1")
RUN = [
    "experiment=tiny",
    "data.source.num_train=16",  # 4 batches of 4: one epoch, refreshed after steps 2 and 4
    "data.source.num_val=4",
    "data.source.num_test=4",
    "trainer.max_steps=4",
    "trainer.val_check_interval=4",
    "model.refine.on_policy.fraction=1.0",
    "model.refine.on_policy.every_n_steps=2",
    "model.refine.on_policy.num_samples=16",  # every training query gets a guess
]


def run(output_dir: Path, num_workers: int) -> tuple[dict, dict]:
    result = launched.run(
        ["train.py", *RUN, f"data.num_workers={num_workers}", f"output_dir={output_dir}"],
        env=ENV,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    last = torch.load(output_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return last["state_dict"], json.loads((output_dir / "metrics.json").read_text())


@pytest.mark.slow
def test_on_policy_run_does_not_depend_on_num_workers(tmp_path):
    """Before: each worker collated with the guesses of the epoch's start (none), so step 3 on differed."""
    weights, metrics = run(tmp_path / "w0", 0)
    workers_weights, workers_metrics = run(tmp_path / "w2", 2)
    for name, tensor in weights.items():
        torch.testing.assert_close(workers_weights[name], tensor, rtol=0, atol=0, msg=name)
    assert workers_metrics == metrics


def test_workers_hand_out_items_that_are_collated_with_the_guesses_of_the_step(tmp_path):
    """Before: the workers, started with the pass, collated every batch with the guesses they had then."""
    overrides = [*tiny_build_overrides(tmp_path), "data.num_workers=2", "data.batch_size=4"]
    datamodule = build_datamodule(load_config([*overrides, "model.refine.on_policy.fraction=1"]))
    datamodule.setup("fit")
    batches = iter(datamodule.train_dataloader())
    next(batches)  # the workers start with the pass, before any guess
    datamodule.coarse_guesses.update({r.qid: (10, 20) for r in datamodule.records("train")})  # a refresh
    batch = datamodule.on_before_batch_transfer(next(batches), 0)
    dataset = datamodule.datasets["train"]
    items = [dataset[(0, dataset.records.index(r))] for r in batch["records"]]
    assert torch.equal(batch["labels"], datamodule.collator(items)["labels"])
    assert all(datamodule.collator.target_rounds(r, 0, 0)[0].start == 10 for r in batch["records"])

    plain = build_datamodule(load_config(overrides))  # without on-policy: collated in the workers
    plain.setup("fit")
    collated = next(iter(plain.train_dataloader()))
    assert isinstance(collated, dict) and plain.on_before_batch_transfer(collated, 0) is collated


def test_evaluation_targets_take_no_training_guess(tmp_path):
    """Before: one collator served every split and looked guesses up by qid alone, so a validation
    query named as a training one (JSONL files may each number theirs from 0) took that query's guess,
    and ``val/loss`` moved with training (found by a review)."""
    overrides = [*tiny_build_overrides(tmp_path), "model.refine.on_policy.fraction=1"]
    datamodule = build_datamodule(load_config(overrides))
    datamodule.setup("fit")
    before = next(iter(datamodule.val_dataloader()))
    datamodule.coarse_guesses.update({r.qid: (10, 20) for r in datamodule.records("val")})  # a clash
    after = next(iter(datamodule.val_dataloader()))
    assert torch.equal(after["labels"], before["labels"])


def test_guesses_are_refreshed_once_a_step_and_only_once_the_lm_trains(tmp_path, caplog):
    """Before: refreshes ran during ``saliency.projector_steps``, caching guesses of an LM not yet
    trained as targets for later, and once per accumulated batch of a step (found by a review)."""
    given = [
        "experiment=tiny",
        "model.saliency.projector_steps=6",
        "trainer.max_steps=8",
        "trainer.val_check_interval=8",
        "data.global_batch_size=32",  # 8 batches of 4 a step
        "model.refine.on_policy.fraction=1.0",
        "model.refine.on_policy.every_n_steps=2",
        "model.refine.on_policy.num_samples=8",
        "callbacks.refinement_trace=0",
        "test=false",
        f"output_dir={tmp_path / 'run'}",
    ]
    with caplog.at_level(logging.INFO, logger="callbacks.on_policy"):
        assert train.main(given) == 0
    refreshes = [r for r in caplog.records if r.getMessage().startswith("on-policy refinement:")]
    assert len(refreshes) == 1  # after step 8, the LM's second step
