"""A run whose training diverges stops in one line naming the step, and its last.ckpt stays a resume
point with finite weights (before: the run went on with a NaN loss, predicted ``00 to 00`` and printed
its table as if valid)."""

from __future__ import annotations

import torch

import train
from lightning_modules.optimization import NonFiniteLossError, finite_loss
from timerefine.pipeline.errors import INPUT_ERRORS


def test_a_non_finite_loss_is_refused():
    assert finite_loss(torch.tensor(1.5), 3, 1e-3) == 1.5
    for bad in (float("nan"), float("inf")):
        try:
            finite_loss(torch.tensor(bad), 7, 1e-3)
        except NonFiniteLossError as error:
            assert str(error).startswith(f"train/loss is {bad} at step 7: training diverged")
        else:
            raise AssertionError("a non-finite loss passed")
    assert NonFiniteLossError in INPUT_ERRORS  # train.py: one line, exit 2


def test_a_diverging_run_stops_and_keeps_a_finite_last_checkpoint(tmp_path, capsys):
    output_dir = tmp_path / "run"
    argv = [
        "experiment=tiny",
        "model.optim.lr=1e6",  # AdamW at this lr makes the gradients non-finite within a few steps
        "callbacks.checkpoint.last_every_n_steps=1",
        "logger.tensorboard=false",
        f"output_dir={output_dir}",
    ]
    assert train.main(argv) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        line.startswith("error: the gradients are not finite at step ")
        and "model.optim.lr (now 1e+06)" in line
    )
    checkpoint = torch.load(output_dir / "checkpoints" / "last.ckpt", weights_only=False)
    step = int(line.split(" at step ")[1].split(":")[0])
    assert checkpoint["global_step"] == step  # the step before the non-finite update
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values() if t.is_floating_point())
    assert not (output_dir / "metrics.json").exists()  # no table, no scores of a diverged model
