"""The default run, timed end to end: ``python train.py`` in a child process, on a fresh output folder.

    python -m bench.default_run --profile            # the default run (under 2 min on 2 free Xeon cores)
    python -m bench.default_run --reference "" --threads 1 --reference-threads 2 --rounds 2  # in turns
    python -m bench.default_run --quick              # a seconds-long smoke run (experiment=tiny)
    python -m bench.default_run --reference "" --env ONEDNN_MAX_CPU_ISA=AVX2 --env ATEN_CPU_CAPABILITY=avx2 \
        --env MKL_ENABLE_INSTRUCTIONS=AVX2         # the default run as on a CPU without bf16, vs as here

Prints ``wall_s`` (seconds from launch to exit), ``cpu_s`` (the child's user + system CPU seconds: with
``--threads 1`` less inflated than wall_s on a shared machine; with more threads, waiting threads spin
and inflate it), ``peak_rss_mb`` (the child's peak resident memory), ``test_mIoU`` and ``prior_mIoU``
(the best constant segment, from the run's ``metrics.json``), and with ``--profile`` (Lightning's
SimpleProfiler, ``+trainer.profiler=simple``) where the time went: ``train_steps_s`` (forward, backward,
optimizer), ``data_s``, ``val_s``, ``test_s``, ``checkpoint_s`` and ``other_s`` (start-up: imports, data
generation, tokenizer training; the prior; outputs). With ``--reference`` a run with those overrides
takes turns with the run (``--rounds`` times, the reference first in even rounds and the run in odd ones,
so both see the machine alike); figures are medians over the rounds and ``wall_ratio`` is the median of
the per-round wall_s / reference wall_s. ``--env`` sets environment variables of the run only (not the
reference), e.g. to emulate a CPU without bf16 instructions; the precision each run chose
(``trainer.precision: auto``) is printed from its ``metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.arguments import key_value, new_folder
from bench.figures_out import in_turns, machine, median_ratio, print_figures
from timerefine.pipeline.arguments import at_least_one

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["experiment=tiny", "logger.tensorboard=false"]
# SimpleProfiler actions summed into each phase, from the process's last report (each report --
# after fit, validate, test -- holds everything recorded so far).
PHASES = {
    "train_steps_s": ("run_training_batch",),
    "data_s": ("[_TrainingEpochLoop].train_dataloader_next",),
    "val_s": ("validation_step", "[_EvaluationLoop].val_next"),
    "test_s": ("test_step", "[_EvaluationLoop].test_next"),
    "checkpoint_s": ("save_checkpoint",),
}
ROW = re.compile(r"^\|\s+(\S.*?)\s+\|\s+\S+\s+\|\s+(\d+)\s+\|\s+([\d.e+-]+)\s+\|")


def phase_seconds(log: str) -> dict[str, float]:
    """Seconds per phase from the last SimpleProfiler table in a run's log."""
    totals = dict.fromkeys(PHASES, 0.0)
    last_report = log[log.rfind("|  Action") :]
    for line in last_report.splitlines():
        match = ROW.match(line.replace("\t", " "))
        if not match:
            continue
        action, seconds = match.group(1), float(match.group(3))
        for phase, names in PHASES.items():
            if any(action == n or action.endswith(f".{n}") for n in names):
                totals[phase] += seconds
    return totals


def run_once(
    overrides: list[str],
    profile: bool,
    keep: Path | None,
    threads: int | None = None,
    extra_env: dict[str, str] | None = None,
) -> dict[str, float]:
    """One ``python train.py`` with ``overrides`` (``threads``: its OMP_NUM_THREADS; ``extra_env``: more
    environment): wall and CPU seconds, peak RSS, scores (and phases)."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}), **(extra_env or {}))
    with tempfile.TemporaryDirectory() as tmp:
        output_dir = keep or Path(tmp) / "run"
        args = [
            sys.executable,
            str(ROOT / "train.py"),
            *overrides,
            "callbacks.progress_bar=none",
            f"output_dir={output_dir}",
            *(["+trainer.profiler=simple"] if profile else []),
        ]
        log_path = Path(tmp) / "log.txt"
        with open(log_path, "w") as log:
            start = time.perf_counter()
            child = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(child.pid, 0)
            wall = time.perf_counter() - start
            child.returncode = os.waitstatus_to_exitcode(status)
        log_text = log_path.read_text()
        if child.returncode:
            sys.exit(f"error: train.py exited with {child.returncode}:\n{log_text[-3000:]}")
        metrics = json.loads((output_dir / "metrics.json").read_text())
    print(f"precision: {metrics.get('trainer/precision')} ({metrics.get('trainer/precision_reason')})")
    figures = {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mb": usage.ru_maxrss / 1024,  # KiB on Linux
        "test_mIoU": metrics.get("test/mIoU", math.nan),
        "prior_mIoU": metrics.get("prior/mIoU", math.nan),
    }
    if profile:
        phases = phase_seconds(log_text)
        figures |= phases | {"other_s": wall - sum(phases.values())}
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="overrides of the run (default: none)")
    parser.add_argument("--reference", help="overrides of a reference run, one quoted string")
    parser.add_argument(
        "--threads", type=at_least_one, help="OMP_NUM_THREADS of the run (default: inherited)"
    )
    parser.add_argument("--reference-threads", type=at_least_one, help="OMP_NUM_THREADS of the reference run")
    parser.add_argument(
        "--rounds", type=at_least_one, default=1, help="reference and run take turns this often"
    )
    parser.add_argument("--profile", action="store_true", help="phase seconds (SimpleProfiler)")
    parser.add_argument("--quick", action="store_true", help="experiment=tiny: a smoke test")
    parser.add_argument("--keep", type=new_folder, help="write the last round's run here and keep it")
    parser.add_argument(
        "--env",
        type=key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment of the run only",
    )
    args = parser.parse_args(argv)
    extra_env = dict(args.env)
    base = QUICK if args.quick else []
    print(f"machine: {machine()}")
    environment = " ".join(f"{k}={v}" for k, v in extra_env.items())
    print(
        f"command: {environment + ' ' if environment else ''}python train.py {shlex.join(base + args.overrides)}"
    )
    if args.reference is not None:
        print(f"reference: python train.py {shlex.join(base + shlex.split(args.reference))}", flush=True)
    runs: list[dict[str, float]] = []
    references: list[dict[str, float]] = []
    arms = ["reference", "run"] if args.reference is not None else ["run"]
    for round_ in range(args.rounds):
        for who in in_turns(arms, round_):
            if who == "reference":
                overrides = base + shlex.split(args.reference)
                references.append(run_once(overrides, args.profile, None, args.reference_threads))
            else:
                keep = args.keep if round_ == args.rounds - 1 else None  # a fresh folder every round
                runs.append(run_once(base + args.overrides, args.profile, keep, args.threads, extra_env))
        print(
            f"round: {runs[-1]['wall_s']:.1f} s"
            + (f" (reference {references[-1]['wall_s']:.1f} s)" if references else "")
        )
    figures = {name: statistics.median(r[name] for r in runs) for name in runs[0]}
    if references:
        figures |= {f"reference_{n}": statistics.median(r[n] for r in references) for n in references[0]}
        figures["wall_ratio"] = median_ratio([r["wall_s"] for r in runs], [r["wall_s"] for r in references])
    print(f"machine after: {machine()}")
    print_figures(figures)


if __name__ == "__main__":
    main()
