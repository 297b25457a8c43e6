"""GRPO after supervised training vs the same wall time of continued supervised training.

    python -m bench.grpo                      # from the default run: 3 seeds, rewards iou/time_r1/refine_gain
    python -m bench.grpo --base runs/x --steps 200 --rewards iou refine_gain --seeds 0 1 2
    python -m bench.grpo --quick              # experiment=tiny, one seed, one reward, a few steps (seconds)

Trains (or takes, ``--base``) a supervised run, then per seed: ``--steps`` GRPO steps per reward
(``experiment=grpo init_from_run=<base>``) and continued supervised training (``init_from_run=<base>``)
for as many steps as take the training time of the GRPO run (its steps x the GRPO/SFT cost ratio,
measured first with ``--steps`` of each at seed 0; a later run with a cost run's settings is that
run, not trained again). Each run is a child ``python train.py`` profiled by Lightning's SimpleProfiler:
the ratio divides training seconds (steps and batch loading, as ``bench.default_run`` sums them), not
wall times, which also hold start-up, validation and the test and so understate a GRPO step's cost.
Every run validates once, at its last step, so each test scores that run's final model
(``--stage trainer.val_check_interval=<n>`` gives all of them another interval).
Figures: ``step_cost_ratio`` (that ratio), ``wall_cost_ratio`` (the same runs' wall times, for
comparison; contended on a shared machine), ``sft_steps``, then per reward and for ``sft`` the mean test
mIoU and R1@0.7 over the seeds (and the mIoU's sample std), and ``gain_mIoU_<reward>`` /
``gain_R1@0.7_<reward>`` over continued SFT.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.arguments import new_folder, run_folder
from bench.default_run import phase_seconds
from bench.figures_out import machine, print_figures
from grounding.metrics.rewards import REWARDS
from timerefine.pipeline.arguments import at_least_one

ROOT = Path(__file__).resolve().parents[1]
QUICK_BASE = [
    "experiment=tiny",
    "data.source.num_train=32",
    "trainer.max_steps=8",
    "trainer.val_check_interval=4",
]
QUICK_STAGE = [
    "data.source.num_train=32",
    "data.source.num_val=8",
    "data.source.num_test=8",
    "data.batch_size=4",
    "grpo.G=4",
]
COMMON = ["logger.tensorboard=false", "callbacks.progress_bar=none"]


def train(overrides: list[str], output_dir: Path) -> tuple[float, dict[str, float]]:
    """Training seconds of a profiled ``python train.py`` (steps and batch loading) and its
    metrics.json with its wall seconds (``wall_s``)."""
    start = time.perf_counter()
    command = [
        sys.executable,
        "train.py",
        *COMMON,
        *overrides,
        f"output_dir={output_dir}",
        "+trainer.profiler=simple",
    ]
    result = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}")
    wall = time.perf_counter() - start
    phases = phase_seconds(result.stdout)
    metrics = json.loads((output_dir / "metrics.json").read_text())
    return phases["train_steps_s"] + phases["data_s"], metrics | {"wall_s": wall}


def at_end(steps: int) -> list[str]:
    """One validation, at the run's last step: its test then scores its final model, and no arm picks a
    best among validations the other lacks (GRPO's own interval is 50 steps, a supervised run's 500)."""
    return [f"trainer.val_check_interval={steps}"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--base", type=run_folder, help="a finished supervised run (default: train the default run)"
    )
    parser.add_argument("--steps", type=at_least_one, default=200, help="GRPO steps per run")
    parser.add_argument("--rewards", nargs="+", choices=REWARDS, default=["iou", "time_r1", "refine_gain"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--grpo", nargs="*", default=[], help="more overrides of the GRPO runs")
    parser.add_argument("--stage", nargs="*", default=[], help="overrides of every run after the base")
    parser.add_argument("--quick", action="store_true", help="experiment=tiny, one seed, iou, 4 steps")
    parser.add_argument("--keep", type=new_folder, help="write the runs to <keep>/<run> and keep them")
    args = parser.parse_args(argv)
    stage = [*args.stage]
    if args.quick:
        args.steps, args.rewards, args.seeds, stage = 4, ["iou"], [0], [*QUICK_STAGE, *stage]
    print(f"machine: {machine()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_grpo_") as folder:
        tmp = args.keep or Path(folder)
        base = args.base
        if base is None:
            base = tmp / "base"
            train(QUICK_BASE if args.quick else [], base)
        start = [f"init_from_run={base}", *stage]
        trained: dict[tuple[str, ...], tuple[float, dict[str, float]]] = {}

        def once(overrides: list[str], output_dir: Path) -> tuple[float, dict[str, float]]:
            """The run of ``overrides``, trained once: the first seed's runs may repeat the cost runs'."""
            if (key := tuple(overrides)) not in trained:
                trained[key] = train(overrides, output_dir)
            return trained[key]

        def grpo(reward: str, seed: int) -> tuple[float, dict[str, float]]:
            overrides = [
                "experiment=grpo",
                *at_end(args.steps),
                *start,
                f"grpo.reward=[{reward}]",
                *args.grpo,
            ]
            return once(
                [*overrides, f"seed={seed}", f"trainer.max_steps={args.steps}"], tmp / f"{reward}{seed}"
            )

        def sft(steps: int, seed: int, name: str) -> tuple[float, dict[str, float]]:
            return once([*at_end(steps), *start, f"seed={seed}", f"trainer.max_steps={steps}"], tmp / name)

        grpo_seconds, grpo_cost = grpo(args.rewards[0], args.seeds[0])
        sft_seconds, sft_cost = sft(args.steps, args.seeds[0], "sft_cost")
        if not grpo_seconds or not sft_seconds:
            sys.exit(
                f"error: no training time in the cost runs' profiler tables ({tmp}): "
                "the table's layout changed (bench.default_run.PHASES)"
            )
        ratio = grpo_seconds / sft_seconds
        wall_ratio = grpo_cost["wall_s"] / sft_cost["wall_s"]
        sft_steps = max(1, round(args.steps * ratio))
        scores: dict[str, list[dict[str, float]]] = {name: [] for name in [*args.rewards, "sft"]}
        for seed in args.seeds:
            scores["sft"].append(sft(sft_steps, seed, f"sft{seed}")[1])
            for reward in args.rewards:
                scores[reward].append(grpo(reward, seed)[1])
            for name, runs in scores.items():
                test = runs[-1]
                print(
                    f"seed {seed} {name}: test mIoU {test['test/mIoU']:.2f}, R1@0.7 {test['test/R1@0.7']:.2f}",
                    flush=True,
                )
    figures: dict[str, float | int] = {
        "step_cost_ratio": ratio,
        "wall_cost_ratio": wall_ratio,
        "sft_steps": sft_steps,
    }
    mean = {
        name: {m: statistics.mean(s[f"test/{m}"] for s in runs) for m in ("mIoU", "R1@0.7")}
        for name, runs in scores.items()
    }
    for name, values in mean.items():
        figures |= {f"{name}_mIoU": values["mIoU"], f"{name}_R1@0.7": values["R1@0.7"]}
        if len(args.seeds) > 1:
            figures[f"{name}_mIoU_std"] = statistics.stdev(s["test/mIoU"] for s in scores[name])
    for reward in args.rewards:
        figures[f"gain_mIoU_{reward}"] = mean[reward]["mIoU"] - mean["sft"]["mIoU"]
        figures[f"gain_R1@0.7_{reward}"] = mean[reward]["R1@0.7"] - mean["sft"]["R1@0.7"]
    print(f"machine after: {machine()}")
    print_figures(figures)


if __name__ == "__main__":
    main()
