"""SIGTERM to a 2-process DDP run (gloo on CPU), at whatever moment it comes: the ranks stop together at
a step boundary, save ``last.ckpt``, exit 143 with one line, and the resumed run ends as an
uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONTINUES = "the same command with output_dir={} continues it"  # the default output_dir is a new folder
ENV = dict(os.environ, OMP_NUM_THREADS="1")
RUN = [
    "experiment=tiny",
    "trainer=ddp",
    "trainer.accelerator=cpu",
    "trainer.max_steps=60",
    "callbacks.checkpoint.last_every_n_steps=4",
    "test=false",
]


def command(output_dir: Path) -> list[str]:
    return [sys.executable, "train.py", *RUN, f"output_dir={output_dir}"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("ddp-signals") / "uninterrupted"
    done = subprocess.run(command(output_dir), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return output_dir


def terminated(output_dir: Path, delay: float) -> tuple[int, str]:
    """Start the run, ``kill -TERM`` its main process ``delay`` seconds after the first ``last.ckpt``;
    its exit status and stderr. A hung run is killed (rank processes and all) and fails the test."""
    last = output_dir / "checkpoints" / "last.ckpt"
    process = subprocess.Popen(
        command(output_dir), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    while not last.exists():
        assert process.poll() is None, process.stderr.read()[-4000:]
        time.sleep(0.01)
    time.sleep(delay)
    ranks = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signal.SIGTERM)
    try:
        _, err = process.communicate(timeout=120)
        _, alive = psutil.wait_procs(ranks, timeout=30)
    except subprocess.TimeoutExpired:
        for rank in [process, *ranks]:
            rank.kill()
        pytest.fail(f"the run hung after SIGTERM ({delay} s after the first last.ckpt)")
    assert not alive, f"rank processes left running: {alive}"
    return process.returncode, err


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 1.1])  # right after a checkpoint, and mid-training (~30 s each)
def test_sigterm_stops_ddp_ranks_together_and_the_run_resumes_exactly(tmp_path, uninterrupted, delay):
    """Before: Lightning's handler broadcast inside the signal handler, and each rank raised its own
    SIGTERMException: the ranks met in mismatched collectives and hung (4 times in 7), else each printed
    the stop line. Now the handler sets a flag, the ranks agree at a step boundary and stop there."""
    output_dir = tmp_path / "run"
    returncode, err = terminated(output_dir, delay)
    last = output_dir / "checkpoints" / "last.ckpt"
    assert returncode == 128 + 15, err[-4000:]
    line = f"stopped by SIGTERM: {last} is the resume point; {CONTINUES.format(output_dir)}"
    assert err.count("stopped by SIGTERM") == 1 and line in err, err[-4000:]
    assert not (output_dir / "metrics.json").exists()
    step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert 4 <= step < 60, "SIGTERM came after training"

    resumed = subprocess.run(
        command(output_dir), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    expected = json.loads((uninterrupted / "metrics.json").read_text())
    assert json.loads((output_dir / "metrics.json").read_text()) == expected
