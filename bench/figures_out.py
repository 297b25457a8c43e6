"""What every benchmark script shares: the machine it ran on, interleaved timing rounds, and the
closing ``name=value`` lines (printed last, parsed by tests/test_bench_scripts.py)."""

from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from timerefine.pipeline.precision import cpu_bf16_instructions

Arm = TypeVar("Arm")


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name and its bf16 instructions (they decide ``trainer.precision: auto``)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    name = next(
        (line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), ""
    )
    bf16 = ", ".join(cpu_bf16_instructions(text)) or "no bf16 instructions"
    return f"{name or 'unknown CPU'} ({bf16})"


def cpu_name(cpuinfo: str | None = None) -> str:
    """The CPU's model name and its bf16 instruction sets (``/proc/cpuinfo``; the architecture where
    that is unreadable): whether bf16 autocast is a lever or a cost depends on them."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.is_file() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    if not re.search(r"^flags\s*:", cpuinfo, re.M):
        return model.group(1).strip() if model else platform.machine()
    bf16 = cpu_bf16_instructions(cpuinfo)
    name = model.group(1).strip() if model else platform.machine()
    return f"{name} ({' + '.join(bf16) if bf16 else 'no bf16 instructions'})"


def machine() -> str:
    """CPU model, count, load average, Python/torch versions, intra-op threads and the date: the
    context a ratio was measured in."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{cpu_name()}, {os.cpu_count()} CPUs, load average {load}, Python "
        f"{platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} intra-op "
        f"thread(s), {datetime.datetime.now().isoformat(timespec='minutes')}"
    )


def in_turns(arms: list[Arm], round_: int) -> list[Arm]:
    """The order of the arms in round ``round_``: rotated by one each round, so each goes first as often
    as the others (the first to run after start-up meets cold caches)."""
    shift = round_ % len(arms)
    return arms[shift:] + arms[:shift]


def interleaved(runs: dict[Arm, Callable[[], object]], rounds: int) -> dict[Arm, list[float]]:
    """Seconds per call of each run, taking turns (:func:`in_turns`) for ``rounds`` rounds so that load
    from other jobs hits them alike."""
    seconds: dict[Arm, list[float]] = {name: [] for name in runs}
    for round_ in range(rounds):
        for name in in_turns(list(runs), round_):
            start = time.perf_counter()
            runs[name]()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    """The median of per-round ratios: each round's two timings saw the same machine load."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def print_figures(figures: dict[str, float | int | str]) -> None:
    """The script's figures, one ``name=value`` line each, last in its output."""
    for name, value in figures.items():
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"{name}={text}", flush=True)
