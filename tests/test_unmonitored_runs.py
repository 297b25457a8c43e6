"""A run without a monitor (``callbacks.checkpoint.monitor: null``, the reference recipe's and the
paper experiments'): tested on its final weights, which evaluate.py's ``best`` is too."""

from __future__ import annotations

import json

from timerefine import evaluate, train

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


def test_checkpoints_kept_without_a_monitor_are_not_tested(tmp_path):
    """save_top_k=-1 keeps every validated checkpoint (a run saved before this still loads); the test
    and evaluate.py's best are still the final weights."""
    run_dir = tmp_path / "run"
    assert train.main([*RUN, "callbacks.checkpoint.save_top_k=-1", f"output_dir={run_dir}"]) == 0
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "best-step2.ckpt",
        "best-step4.ckpt",
        "last.ckpt",
    ]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["checkpoint"], metrics["checkpoint/step"]) == ("final weights", 5)
    assert evaluate.main([str(run_dir)]) == 0
    evaluated = json.loads((run_dir / "eval" / "test" / "metrics.json").read_text())
    assert (evaluated["checkpoint"], evaluated["test/loss"]) == (
        "checkpoints/last.ckpt",
        metrics["test/loss"],
    )


def test_a_best_checkpoint_it_does_not_test_may_be_unreadable(tmp_path):
    """Before (this change's first version): continuing it was refused over a best checkpoint that its
    resume point records but, without a monitor, nothing tests."""
    run_dir = tmp_path / "run"
    assert train.main([*RUN, "callbacks.checkpoint.save_top_k=-1", f"output_dir={run_dir}"]) == 0
    best = run_dir / "checkpoints" / "best-step4.ckpt"
    best.write_bytes(best.read_bytes()[:1000])
    longer = [*RUN, "callbacks.checkpoint.save_top_k=-1", "trainer.max_steps=6", f"output_dir={run_dir}"]
    assert train.main(longer) == 0
    assert json.loads((run_dir / "metrics.json").read_text())["checkpoint/step"] == 6
