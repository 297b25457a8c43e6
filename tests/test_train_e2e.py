"""One short real ``train.py`` run on tiny sizes, its outputs, and a resumed second invocation."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from grounding.metrics.iou import temporal_iou
from timerefine.pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]
NUM_TRAIN, NUM_TEST, BATCH = 64, 16, 8
BATCHES_PER_EPOCH = NUM_TRAIN // BATCH
TINY = [
    "trainer.val_check_interval=15",
    "model.saliency.projector_steps=0",
    "trainer.log_every_n_steps=1",
    f"data.source.num_train={NUM_TRAIN}",
    "data.source.num_val=16",
    f"data.source.num_test={NUM_TEST}",
    f"data.batch_size={BATCH}",
    "data.eval_batch_size=16",
    "model.lm.tiny.hidden_size=32",
    "model.lm.tiny.num_layers=1",
    "model.lm.tiny.num_heads=2",
    "model.lm.tiny.intermediate_size=64",
    "model.lm.tokenizer_vocab_size=300",
    "callbacks.progress_bar=none",
    "trainer.enable_progress_bar=false",
    # A monitored value that never improves after its first check (constrained decoding always
    # parses): whether last.ckpt follows the run must not depend on the tiny model's luck.
    "callbacks.checkpoint.monitor=val/parse_fail",
    "callbacks.checkpoint.mode=min",
]
PERCENT = ("R1@0.3", "R1@0.5", "R1@0.7", "mIoU", "parse_fail", "coverage")


@dataclass
class Run:
    output_dir: Path
    overrides: list[str]
    result: subprocess.CompletedProcess
    metrics: dict
    last_step: int
    csv_rows: list[dict]
    vocab: dict


def train(output_dir: Path, max_steps: int) -> Run:
    overrides = [*TINY, f"trainer.max_steps={max_steps}", f"output_dir={output_dir}"]
    result = subprocess.run(
        [sys.executable, "train.py", *overrides], cwd=ROOT, capture_output=True, text=True, timeout=400
    )
    assert result.returncode == 0, result.stderr[-4000:]
    last = torch.load(output_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    with open(output_dir / "logs" / "csv" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    vocab = json.loads((output_dir / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    metrics = json.loads((output_dir / "metrics.json").read_text())
    return Run(output_dir, overrides, result, metrics, last["global_step"], rows, vocab)


@pytest.fixture(scope="module")
def first(tmp_path_factory) -> Run:
    return train(tmp_path_factory.mktemp("e2e") / "run", max_steps=30)


@pytest.fixture(scope="module")
def resumed(first) -> Run:
    return train(first.output_dir, max_steps=40)


def test_config_yaml_is_the_composed_config(first):
    saved = OmegaConf.load(first.output_dir / "config.yaml")
    assert saved == load_config(first.overrides)
    assert saved.trainer.max_steps == 30 and saved.output_dir == str(first.output_dir)


def test_metrics_json(first):
    metrics = dict(first.metrics)
    assert metrics["global_step"] == 30
    for split in ("val", "test", "prior"):
        for name in ("R1@0.3", "R1@0.5", "R1@0.7", "mIoU"):
            assert f"{split}/{name}" in metrics
    scored_by = {"eval/protocol": "exact", "data/timeline": "uniform99"}  # the defaults, recorded
    assert {key: metrics.pop(key) for key in scored_by} == scored_by
    assert metrics.pop("trainer/precision") in ("bf16-mixed", "32-true")  # auto, chosen for this machine
    assert metrics.pop("trainer/precision_reason").startswith("auto: ")
    # the weights scored: the best checkpoint (val/parse_fail never improves after step 15)
    assert (metrics.pop("checkpoint"), metrics["checkpoint/step"]) == ("checkpoints/best-step15.ckpt", 15)
    for key, value in metrics.items():
        assert isinstance(key, str)
        assert value is None or (isinstance(value, int | float) and math.isfinite(value)), (key, value)
        if key.rsplit("/", 1)[-1] in PERCENT:
            assert 0 <= value <= 100, (key, value)
    for split in ("val", "test", "prior"):
        assert metrics[f"{split}/R1@0.7"] <= metrics[f"{split}/R1@0.5"] <= metrics[f"{split}/R1@0.3"]
    assert 0 < metrics["prior/mIoU"] < 60
    assert metrics["test/parse_fail"] == 0  # constrained decoding (the default) always parses


def test_predictions_jsonl(first):
    lines = (first.output_dir / "predictions" / "test.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == NUM_TEST
    assert len({row["qid"] for row in rows}) == NUM_TEST
    keys = {"qid", "video_id", "query", "duration", "gt", "pred", "pred_index", "iou", "steps", "text"}
    ious = []
    for row in rows:
        assert keys <= set(row), row
        assert isinstance(row["query"], str) and row["query"] and row["duration"] > 0
        assert len(row["gt"]) == 2 and 0 <= row["gt"][0] <= row["gt"][1] <= row["duration"]
        assert 0 <= row["iou"] <= 1
        assert isinstance(row["text"], str) and isinstance(row["steps"], list)
        if row["pred"] is None:
            assert row["iou"] == 0
        else:
            assert len(row["pred"]) == 2 and 0 <= row["pred"][0] <= row["pred"][1] <= row["duration"] + 1e-3
            iou = float(temporal_iou(torch.tensor([row["pred"]]), torch.tensor([row["gt"]]))[0])
            assert row["iou"] == pytest.approx(iou, abs=2e-3)
            assert row["steps"][-1] == row["pred"]  # the default final answer is the last step
            assert "<SEG_START>" in row["text"] and "<SEG_END>" in row["text"]
        ious.append(row["iou"])
    # The rows and the headline metric come from the same test pass.
    assert 100 * sum(ious) / len(ious) == pytest.approx(first.metrics["test/mIoU"], abs=0.05)


def test_checkpoints_and_logs(first):
    out = first.output_dir
    assert (out / "checkpoints" / "last.ckpt").is_file()
    state = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert any(k.startswith("model.projector") for k in state["state_dict"])
    assert "train/loss" in first.csv_rows[0] and "val/mIoU" in first.csv_rows[0]
    trained = [r for r in first.csv_rows if r.get("train/loss")]
    assert len(trained) == 30 and all(math.isfinite(float(r["train/loss"])) for r in trained)
    # the fit's validations, after steps 15 and 30 (Lightning's step column: the last batch's index);
    # before, the best checkpoint's (step 15's) scores were also logged at step 30 as if the model of step 30's
    assert [int(r["step"]) for r in first.csv_rows if r.get("val/mIoU")] == [14, 29]
    assert not any(r.get("test/mIoU") for r in first.csv_rows)  # step 15's test scores, at step 30
    events = list((out / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and any(e.stat().st_size > 0 for e in events)
    assert (out / "tokenizer" / "tokenizer.json").is_file()


def test_last_checkpoint_holds_the_final_step(first):
    assert first.last_step == 30


@pytest.mark.slow
def test_second_invocation_resumes(first, resumed):
    assert "resuming from" in resumed.result.stderr
    assert resumed.metrics["global_step"] == 40
    assert resumed.vocab == first.vocab  # the run's own tokenizer, not a retrained one
    rows = [json.loads(line) for line in (resumed.output_dir / "predictions" / "test.jsonl").open()]
    assert len(rows) == NUM_TEST


@pytest.mark.slow
def test_resumed_epochs_keep_their_length(first, resumed):
    # After a mid-epoch resume the remaining batches of that epoch are skipped once; every later
    # epoch must have all its batches again.
    trained = [(int(r["epoch"]), int(r["step"])) for r in resumed.csv_rows if r.get("train/loss")]
    assert trained and max(step for _, step in trained) == 39
    for epoch, step in trained:
        assert epoch == step // BATCHES_PER_EPOCH, (epoch, step)


@pytest.mark.slow
def test_resumed_csv_log_continues(first, resumed):
    before = {int(r["step"]) for r in first.csv_rows if r.get("train/loss")}
    after = {int(r["step"]) for r in resumed.csv_rows if r.get("train/loss")}
    assert before <= after
