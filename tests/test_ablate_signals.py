"""timerefine-ablate stopped by SIGTERM (a cluster's job limit, ``kill``): the run it reached is stopped
with it, and a report that holds no run leaves no earlier report's results behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_ablate_cli import TINY, finished_run
from timerefine.tools import ablate

ROOT = Path(__file__).resolve().parents[1]


def processes_naming(text: str) -> list[int]:
    """The pids of the processes whose command line holds ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:  # ended meanwhile
            continue
    return found


def started_ablation(tmp_path: Path, ignoring_sigint: bool = False) -> tuple[subprocess.Popen, Path]:
    """The tool in a process group of its own (SIGINT ignored, as a shell starts a background job),
    once its run has started training."""
    out = tmp_path / "abl"
    longer = ["experiment=tiny", "trainer.max_steps=5000", "trainer.val_check_interval=5000"]
    command = [
        sys.executable,
        "-m",
        "timerefine.tools.ablate",
        "--out",
        str(out),
        "--variant",
        "A=model=direct",
    ]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    tool = subprocess.Popen(
        [*command, "--", *longer],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignoring_sigint else None,
    )
    config = out / "A" / "seed0" / "config.yaml"
    deadline = time.monotonic() + 120
    while not config.is_file() and time.monotonic() < deadline and tool.poll() is None:
        time.sleep(0.2)
    assert config.is_file(), "the run never started"
    time.sleep(2)  # training
    return tool, out


@pytest.mark.slow
def test_a_sigterm_stops_the_run_it_reached(tmp_path):
    """Before: the tool died at once and its train.py ran on alone (a rerun then trained a second
    process into the same folder)."""
    tool, out = started_ablation(tmp_path)
    tool.send_signal(signal.SIGTERM)
    _, err = tool.communicate(timeout=120)
    assert tool.returncode == ablate.STOPPED_BY_SIGTERM
    assert "stopped by SIGTERM: the same command continues the ablation" in err
    assert processes_naming(str(out)) == []  # no train.py left running
    assert (out / "A" / "seed0" / "checkpoints" / "last.ckpt").is_file()  # its resume point


@pytest.mark.slow
def test_ctrl_c_stops_the_tool_in_one_line_after_its_run(tmp_path):
    """Ctrl-C reaches the terminal's whole process group: the tool and its train.py. Before (review):
    the tool died of it with a KeyboardInterrupt traceback while train.py was saving."""
    tool, out = started_ablation(tmp_path)
    os.killpg(tool.pid, signal.SIGINT)
    _, err = tool.communicate(timeout=120)
    assert tool.returncode == ablate.INTERRUPTED, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "interrupted (Ctrl-C): the same command continues the ablation"
    assert processes_naming(str(out)) == []


@pytest.mark.slow
def test_a_background_ablation_ignores_sigint_and_sigterm_names_itself(tmp_path):
    """Before (review of the Ctrl-C change): the handler replaced an ignored SIGINT, so its train.py
    started with SIGINT live and a group SIGINT stopped a background job; and a SIGTERM after a SIGINT
    to the tool alone exited 130 as 'interrupted (Ctrl-C)'."""
    tool, out = started_ablation(tmp_path, ignoring_sigint=True)
    os.killpg(tool.pid, signal.SIGINT)
    time.sleep(5)
    assert tool.poll() is None, "a background ablation stopped on SIGINT"
    tool.send_signal(signal.SIGTERM)
    _, err = tool.communicate(timeout=120)
    assert tool.returncode == ablate.STOPPED_BY_SIGTERM, err
    assert (out / "A" / "seed0" / "checkpoints" / "last.ckpt").is_file()
    (tmp_path / "alone").mkdir()
    tool, out = started_ablation(tmp_path / "alone")
    tool.send_signal(signal.SIGINT)  # the tool alone: its train.py runs on
    time.sleep(1)
    tool.send_signal(signal.SIGTERM)
    _, err = tool.communicate(timeout=120)
    assert tool.returncode == ablate.STOPPED_BY_SIGTERM, err
    assert "stopped by SIGTERM: the same command continues the ablation" in err


def test_a_report_of_no_run_removes_an_earlier_reports_results(tmp_path, capsys):
    """Before: results.md and .csv of the earlier command stayed, beside 'no finished runs'."""
    finished_run(tmp_path, "A", ["model=direct"], 0, 2.0)
    argv = ["--out", str(tmp_path), "--variant", "A=model=direct", "--report-only", "--", *TINY]
    assert ablate.main(argv) == 0
    assert (tmp_path / "results.md").is_file() and (tmp_path / "results.csv").is_file()
    assert ablate.main([*argv, "model.optim.lr=1e-4"]) == 1  # other settings: A is not finished
    assert not any((tmp_path / name).exists() for name in ablate.RESULTS)
    assert "removed results.csv, results.md, results.png" in capsys.readouterr().err


def test_a_report_reads_no_checkpoint(tmp_path, capsys):
    """A finished run whose last.ckpt is damaged is still reported (before, in this change's first
    version: a CheckpointError traceback, since finding a finished run read its resume point)."""
    finished_run(tmp_path, "A", ["model=direct"], 0, 2.0)
    (tmp_path / "A" / "seed0" / "checkpoints").mkdir()
    (tmp_path / "A" / "seed0" / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")
    argv = ["--out", str(tmp_path), "--variant", "A=model=direct", "--report-only", "--", *TINY]
    assert ablate.main(argv) == 0
    assert "| A | 1 | 8 | 2.00 |" in capsys.readouterr().out
