"""A whole FSDP run on 2 CPU processes (gloo): training with gradient clipping and on-policy refinement,
the refinement trace, sharded checkpoints, and the final validation and test of its best checkpoint,
whose scores and weights are those of the same run under DDP. Lightning's FSDPStrategy refuses a CPU:
tests/cpu_fsdp.py runs train.py with the project's strategy placing FSDP's units on the CPU.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tests.test_distributed import TINY, _run
from timerefine.pipeline.best_checkpoint import checkpoint_path
from timerefine.pipeline.resume import read_checkpoint

RUN = [
    *TINY,
    "model.refine.on_policy.fraction=0.5",
    "model.refine.on_policy.every_n_steps=2",
    "model.refine.on_policy.num_samples=8",
    "trainer.devices=2",
    "trainer.precision=32-true",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
]


@pytest.mark.distributed
@pytest.mark.slow
def test_an_fsdp_run_trains_and_scores_as_the_ddp_run(tmp_path: Path) -> None:
    """Before, every FSDP run stopped: at its first step (Lightning's FSDP precision refuses clipping by
    norm), then at the first validation's refinement trace and the on-policy refresh (a layer outside
    the root unit's forward saw its flat shard), then at the final validation (Lightning dropped the
    root unit: "'weight' must be 2-D"); a sharded checkpoint read whole had no state_dict."""
    fsdp, ddp = tmp_path / "fsdp", tmp_path / "ddp"
    said = _run("tests/cpu_fsdp.py", *RUN, "trainer=fsdp", f"output_dir={fsdp}")
    _run("train.py", *RUN, "trainer.strategy=ddp", f"output_dir={ddp}")
    assert re.search(r"on-policy refinement: [1-9]\d* queries now start", said)
    parts = re.findall(r"^  (\w+(?: \w+)?) +(?:trains|frozen) +([\d,]+) of", said, re.MULTILINE)
    assert dict(parts)["projector"] != "0"  # counted before FSDP flattens the parts into its units
    assert [p.name for p in sorted((fsdp / "refinement_trace").glob("*.png"))] == [
        "step000002.png",
        "step000004.png",
    ]
    assert (fsdp / "checkpoints" / "last.ckpt").is_dir()  # sharded: a folder per checkpoint
    sharded, replicated = (json.loads((run / "metrics.json").read_text()) for run in (fsdp, ddp))
    assert sharded.keys() == replicated.keys()
    scores = [k for k, v in replicated.items() if k.startswith(("val/", "test/")) and isinstance(v, float)]
    assert "test/mIoU" in scores and "val/loss" in scores
    for key in scores:  # the same sums in another order: equal to float rounding
        assert sharded[key] == pytest.approx(replicated[key], rel=1e-5, abs=1e-5), key

    # the sharded best checkpoint, read whole (init_from_run, predict, export): the DDP run's weights
    best, reference = (read_checkpoint(checkpoint_path(run, "best"))["state_dict"] for run in (fsdp, ddp))
    assert best.keys() == reference.keys()
    for name, weight in reference.items():
        torch.testing.assert_close(best[name], weight, rtol=1e-4, atol=1e-6, msg=name)
