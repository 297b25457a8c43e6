"""Benchmark paths the quick runs in test_bench_scripts.py do not take: bench.gpu_step's batch search
(a GPU's), arguments that left nothing to time, a split too small for a decoding batch, the order in
which compared arms take turns, and what the arms count (steps, validations, bytes)."""

from __future__ import annotations

import pytest
import torch

from bench import decoding, default_run, gpu_step, grpo, overhead, predict_pairs, scaling
from bench.figures_out import in_turns, interleaved
from lightning_modules.grounding_module import GroundingModule
from timerefine.pipeline.build import build_datamodule, build_module
from timerefine.pipeline.config import load_config


def test_the_batch_search_of_gpu_step_runs_a_step():
    """Review: the search timed 0 steps and divided by 0, so the script failed on every GPU."""
    shape = gpu_step.SHAPES["tiny"]
    dataset, codec = gpu_step.data(shape, 64)
    module = gpu_step.build(shape, codec, torch.device("cpu"))
    assert gpu_step.fits(module, dataset, codec, 2, torch.device("cpu"))


@pytest.mark.parametrize(
    ("script", "argv", "named"),
    [
        (overhead, ["--quick", "--warmup", "12"], "--warmup 12"),  # before: both clocks from 0, a ratio of 1
        (overhead, ["--rounds", "0"], "--rounds"),  # before: StatisticsError
        (gpu_step, ["--quick", "--steps", "0"], "--steps"),  # before: ZeroDivisionError
        (gpu_step, ["--batch", "0"], "--batch"),  # before: max() of an empty sequence
        (decoding, ["--singles", "0", "experiment=tiny"], "the test split holds 8 queries"),  # an IndexError
        (predict_pairs, ["--quick", "--batch-size", "1"], "--batch-size 1 is the reference"),  # self-timed
    ],
)
def test_counts_that_leave_nothing_to_measure_are_one_error_line(script, argv, named, capsys):
    with pytest.raises(SystemExit) as exit_:
        script.main(argv)
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and named in error, error


def test_no_arm_always_goes_first():
    """Review: the reference always ran first, meeting the cold caches of the invocation's start."""
    calls: list[str] = []
    interleaved({arm: (lambda arm=arm: calls.append(arm)) for arm in ("a", "b", "c")}, rounds=3)
    assert calls == [*"abc", *"bca", *"cab"] and in_turns([1, 2], 1) == [2, 1]


def test_default_run_and_its_reference_take_turns(monkeypatch):
    order: list[str] = []

    def fake_run(overrides, profile, keep, threads=None, extra_env=None) -> dict[str, float]:
        order.append("reference" if "seed=1" in overrides else "run")
        return {"wall_s": 1.0}

    monkeypatch.setattr(default_run, "run_once", fake_run)
    default_run.main(["--quick", "--rounds", "3", "--reference", "seed=1"])
    assert order == ["reference", "run", "run", "reference", "reference", "run"]


def test_grpo_and_continued_sft_each_validate_once_at_their_end(monkeypatch):
    """Review: GRPO validated every 50 steps and tested its best validation, continued SFT every 500
    (its runs being shorter: never before its end), a selection only one arm had."""
    runs: list[list[str]] = []

    def fake_train(overrides: list[str], output_dir) -> tuple[float, dict[str, float]]:
        runs.append(overrides)
        seconds = 2.0 if "experiment=grpo" in overrides else 1.0  # continued SFT runs twice the steps
        return seconds, {"wall_s": 1.0, "test/mIoU": 0.0, "test/R1@0.7": 0.0}

    def last(key: str, overrides: list[str]) -> str | None:
        return next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith(f"{key}=")), None)

    monkeypatch.setattr(grpo, "train", fake_train)
    grpo.main(["--quick"])
    stages = runs[1:]  # after the base run: GRPO and SFT cost runs, then SFT (GRPO's is the cost run)
    assert len(stages) == 3 and "experiment=grpo" in stages[0] and "experiment=grpo" not in stages[1]
    assert last("trainer.max_steps", stages[2]) == "8", stages
    assert all(last("trainer.val_check_interval", r) == last("trainer.max_steps", r) for r in stages), stages


class TwoLayers(torch.nn.Module):
    """A step whose activations are 2 x 4 kB and whose second weight (4 MB) backward also saves."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = (torch.nn.Parameter(torch.randn(1000, 1000)) for _ in range(2))

    def _losses(self, batch: dict) -> dict:
        return {"loss": (torch.tanh(batch["x"] @ self.first) @ self.second).sum()}


def test_activation_memory_leaves_the_weights_out():
    """Review: a weight saved for backward counted as activation memory (2-9 % of bench.scaling's)."""
    saved, _ = scaling.saved_bytes(TwoLayers(), {"x": torch.randn(1, 1000)})
    assert saved == 2 * 1000 * 4


def test_the_plain_loop_runs_its_steps_over_epochs(monkeypatch):
    """Review: the plain loop stopped at the end of an epoch (experiment=tiny: 16 batches) while the
    Lightning run went on to max_steps, so the two timed different step counts."""
    cfg = load_config(["experiment=tiny", "data.source.num_train=8", "data.batch_size=4"])  # 2 batches
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule)
    losses = []
    monkeypatch.setattr(
        module, "_losses", lambda batch: losses.append(batch) or GroundingModule._losses(module, batch)
    )
    overhead.raw_loop(module, datamodule, 5, 0, 5, "32-true", None)
    assert len(losses) == 5
