"""A run without a monitor (``callbacks.checkpoint.monitor: null``, the reference recipe's and the
paper experiments'): tested on its final weights, which evaluate.py's ``best`` is too."""

from __future__ import annotations

import json

import pytest

from timerefine import evaluate, train
from timerefine.pipeline.config import ConfigError, load_config

# validated at steps 2 and 4, trained to step 5
RUN = [
    "experiment=tiny",
    "callbacks.checkpoint.monitor=null",
    "trainer.max_steps=5",
    "trainer.val_check_interval=2",
]


def test_the_final_weights_are_tested(tmp_path):
    """Before: Lightning kept the last validated checkpoint as 'best' (step 4) and the run was tested on
    it, while the docs say the final weights (step 5) are."""
    run_dir = tmp_path / "run"
    assert train.main([*RUN, f"output_dir={run_dir}"]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["checkpoint"], metrics["checkpoint/step"], metrics["global_step"]) == (
        "final weights",
        5,
        5,
    )
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt"]
    assert evaluate.main([str(run_dir)]) == 0  # --ckpt best
    evaluated = json.loads((run_dir / "eval" / "test" / "metrics.json").read_text())
    assert (evaluated["checkpoint"], evaluated["checkpoint/step"]) == ("checkpoints/last.ckpt", 5)
    assert {k: v for k, v in evaluated.items() if k.startswith("test/")} == {
        k: v for k, v in metrics.items() if k.startswith("test/")
    }


def test_keeping_several_best_checkpoints_needs_a_monitor():
    with pytest.raises(ConfigError, match="save_top_k=2 needs a monitor"):
        load_config(["callbacks.checkpoint.monitor=null", "callbacks.checkpoint.save_top_k=2"])
