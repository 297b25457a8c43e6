"""A run started from another run's checkpoint (``resume=<its last.ckpt>``, a new ``output_dir``) and
stopped is continued by the same command from its own ``last.ckpt``, as its SIGTERM line says."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import train
from tests.test_resume_runs import SIGNALLED_RUN

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1")
RUN = [
    "experiment=tiny",
    "callbacks.checkpoint.last_every_n_steps=5",
    "logger.tensorboard=false",
    "callbacks.refinement_trace=0",
]


@pytest.mark.slow
def test_the_same_command_continues_a_run_resumed_from_another_runs_checkpoint(tmp_path, caplog):
    """Before: it resumed from the other run's checkpoint again, training steps 10-15 anew, and once
    finished it trained and tested everything again instead of being done."""
    other, run = tmp_path / "other", tmp_path / "run"
    assert train.main([*RUN, "trainer.max_steps=10", f"output_dir={other}"]) == 0
    command = [
        *RUN,
        "trainer.max_steps=20",
        f"resume={other / 'checkpoints' / 'last.ckpt'}",
        f"output_dir={run}",
    ]
    stopped = subprocess.run(  # SIGTERM inside step 18: last.ckpt of step 15 is the resume point
        [sys.executable, "-c", SIGNALLED_RUN, "training_step", "17", "1", str(int(signal.SIGTERM)), *command],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    last = run / "checkpoints" / "last.ckpt"
    assert stopped.returncode == 128 + 15, stopped.stderr[-4000:]
    assert (
        f"{last} is the resume point; the same command with output_dir={run} continues it" in stopped.stderr
    )

    caplog.set_level(logging.INFO)
    assert train.main(command) == 0
    assert f"resuming from {last}" in caplog.messages
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 20
    caplog.clear()
    assert train.main(command) == 0
    assert f"{run} holds this run finished (metrics.json): nothing to do" in caplog.messages


def test_an_unreadable_own_resume_point_gives_way_to_resume(tmp_path, caplog):
    """Before (this change's first version): the folder's own damaged last.ckpt stopped the run, whose
    message advised resume=<another checkpoint>, the very thing given."""
    run = tmp_path / "run"
    assert train.main([*RUN, "trainer.max_steps=10", f"output_dir={run}"]) == 0
    earlier = run / "checkpoints" / "earlier.ckpt"
    (run / "checkpoints" / "last.ckpt").rename(earlier)
    (run / "checkpoints" / "last.ckpt").write_bytes(earlier.read_bytes()[:1000])
    caplog.set_level(logging.INFO)
    assert train.main([*RUN, "trainer.max_steps=12", f"resume={earlier}", f"output_dir={run}"]) == 0
    assert f"resuming from {earlier}" in caplog.messages
    assert any("passing over this run's own resume point" in message for message in caplog.messages)
