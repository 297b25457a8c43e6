"""DDP on 2 CPU processes (gloo): exact evaluation (the single-process metrics and predictions), and
a GRPO stage whose ranks stay in step.

The test split (13 queries, eval batches of 4) divides neither by the process count nor by the batch
size, so padding duplicates or a dropped remainder would change the numbers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from timerefine.pipeline.best_checkpoint import checkpoint_path

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "data.source.num_train=48",
    "data.source.num_val=6",
    "data.source.num_test=13",
    "data.source.num_frames=20",
    "data.batch_size=8",
    "data.eval_batch_size=4",
    "model.lm.tiny.hidden_size=32",
    "model.lm.tiny.num_layers=1",
    "model.lm.tiny.num_heads=2",
    "model.lm.tiny.intermediate_size=64",
    "model.refine.steps=1",
    "model.saliency.projector_steps=0",
    "callbacks.progress_bar=none",
    "logger.tensorboard=false",
    "trainer.accelerator=cpu",
]


def _run(*args: str) -> str:
    """The command's stderr, once it has succeeded."""
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stderr


def _predictions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_evaluation_matches_single_process(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _run(
        "train.py",
        *TINY,
        "trainer.max_steps=12",
        "trainer.val_check_interval=6",
        "test=false",
        f"output_dir={run}",
    )
    _run("evaluate.py", str(run), "--ckpt", "last", "--name", "single")
    said = _run(
        "evaluate.py",
        str(run),
        "--ckpt",
        "last",
        "--name",
        "ddp",
        "trainer.devices=2",
        "trainer.strategy=ddp",
    )
    assert "sync_dist=True" not in said  # before: 12 lines advising it for scores summed over processes

    single = json.loads((run / "eval/single/metrics.json").read_text())
    ddp = json.loads((run / "eval/ddp/metrics.json").read_text())
    assert single["test/queries"] == ddp["test/queries"] == 13
    for key in (
        "test/R1@0.3",
        "test/R1@0.5",
        "test/R1@0.7",
        "test/mIoU",
        "test/step0/mIoU",
        "test/step2/mIoU",
    ):
        assert ddp[key] == pytest.approx(single[key], abs=1e-9), key
    # Lightning's sync_dist mean divided by the ranks' mean batch count as an integer, (7 + 6) // 2
    assert ddp["test/loss"] == pytest.approx(single["test/loss"], rel=1e-5)

    rows_single = _predictions(run / "eval/single/predictions/test.jsonl")
    rows_ddp = _predictions(run / "eval/ddp/predictions/test.jsonl")
    assert [r["qid"] for r in rows_ddp] == [r["qid"] for r in rows_single]
    assert len({r["qid"] for r in rows_ddp}) == 13
    assert [r["pred"] for r in rows_ddp] == [r["pred"] for r in rows_single]


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_grpo_keeps_the_ranks_in_step(tmp_path: Path) -> None:
    """A GRPO stage on 2 processes, two optimizer steps per rollout (several backward passes in one
    training step): it finishes, and both ranks end with the same weights, changed from the start."""
    supervised, grpo, weights = tmp_path / "supervised", tmp_path / "grpo", tmp_path / "weights"
    _run(
        "train.py",
        *TINY,
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "test=false",
        f"output_dir={supervised}",
    )
    _run(
        "-m",
        "tests.ddp_rank_weights",
        str(weights),
        "experiment=grpo",
        f"init_from_run={supervised}",
        *(o for o in TINY if not o.startswith("model.")),  # the model's keys come from the run
        "data.batch_size=2",
        "grpo.G=4",
        "grpo.num_iterations=2",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "test=false",
        f"output_dir={grpo}",
    )

    assert json.loads((grpo / "metrics.json").read_text())["global_step"] == 4
    start = torch.load(checkpoint_path(supervised, "best"), map_location="cpu", weights_only=False)
    rank0, rank1 = (torch.load(weights / f"rank{r}.pt") for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    for name, tensor in rank0.items():
        torch.testing.assert_close(rank1[name], tensor, rtol=0, atol=0, msg=name)
    assert any(
        not torch.equal(tensor, start["state_dict"][name].to(tensor.dtype)) for name, tensor in rank0.items()
    )


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_projector_steps_run_with_the_lm_unused_and_keep_the_ranks_in_step(tmp_path: Path) -> None:
    """``trainer.strategy=ddp`` with projector steps (the LM unused in them, which plain DDP refuses):
    the run finishes and both ranks end with the same weights."""
    weights = tmp_path / "weights"
    _run(
        "-m",
        "tests.ddp_rank_weights",
        str(weights),
        *TINY,
        "model.saliency.projector_steps=2",
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "test=false",
        f"output_dir={tmp_path / 'run'}",
    )
    rank0, rank1 = (torch.load(weights / f"rank{r}.pt") for r in (0, 1))
    for name, tensor in rank0.items():
        torch.testing.assert_close(rank1[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_on_a_train_split_that_the_ranks_do_not_divide_keeps_them_in_step(tmp_path: Path) -> None:
    """49 training queries on 2 processes: before, rank 0 took 7 batches of 8 an epoch and rank 1 6,
    and the run hung at the first epoch's end (found by a review); each now takes 3 batches of 8."""
    weights = tmp_path / "weights"
    _run(
        "-m",
        "tests.ddp_rank_weights",
        str(weights),
        *[arg for arg in TINY if not arg.startswith("data.source.num_train=")],
        "data.source.num_train=49",
        "trainer.max_steps=-1",
        "trainer.max_epochs=2",
        "trainer.val_check_interval=null",
        "trainer.check_val_every_n_epoch=1",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "test=false",
        f"output_dir={tmp_path / 'run'}",
    )
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 2 * 3
    rank0, rank1 = (torch.load(weights / f"rank{r}.pt") for r in (0, 1))
    for name, tensor in rank0.items():
        torch.testing.assert_close(rank1[name], tensor, rtol=0, atol=0, msg=name)
