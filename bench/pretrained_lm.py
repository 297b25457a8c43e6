"""Does pretraining help? Three ``python train.py`` runs on the built-in data, at equal steps and batch:

    python -m bench.pretrained_lm                    # the three arms at experiment=smollm2's steps and batch
    python -m bench.pretrained_lm --quick            # a smoke run: 2 steps on 16 training queries
    python -m bench.pretrained_lm --set scratch="model.optim.lr=1e-3" --arms pretrained,scratch

Arms: ``pretrained`` (experiment=smollm2: SmolLM2-135M-Instruct with LoRA), ``scratch`` (the same
architecture randomly initialised, ``model.lm.weights=random``, every weight trains, at the tiny
default's lr 3e-3) and ``tiny`` (the default run's 1.2 M-parameter LM, its own settings). Every arm
runs ``--steps`` steps (default: experiment=smollm2's, ``--projector-steps`` of them first) at batch
``--batch`` and validates once, at the end, on the same data; ``--set ARM="overrides"`` adds overrides
to one arm (e.g. another lr).

Prints per arm the test mIoU, R1@0.7, the share of answers that did not parse (``parse_fail``, %) and
wall seconds, then the prior (the best constant segment) and the differences that the issue's targets
are about: ``pretrained_minus_scratch_mIoU`` (target >= 5), ``pretrained_minus_prior_mIoU`` (target >= 30).
The arms run one after another: on a shared machine their wall seconds see different loads.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import tempfile
from pathlib import Path

from bench.arguments import new_folder
from bench.default_run import run_once
from bench.figures_out import machine, print_figures
from lightning_modules.pretrained import SMOLLM2, missing_model
from timerefine.pipeline.arguments import at_least, at_least_one
from timerefine.pipeline.config import load_config

ARMS = {
    "pretrained": ["experiment=smollm2"],
    "scratch": [
        "experiment=smollm2",
        "model.lm.weights=random",
        "model.lora.enabled=false",
        "model.optim.lr=3e-3",
    ],
    "tiny": [],
}
QUICK = [
    "data.source.num_train=16",
    "data.source.num_val=4",
    "data.source.num_test=4",
    "data.source.num_frames=16",
    "data.eval_batch_size=4",
    "logger.tensorboard=false",
]
SCORES = {"test_mIoU": "test/mIoU", "test_R1@0.7": "test/R1@0.7", "test_parse_fail": "test/parse_fail"}


def equal_budget(
    steps: int, projector_steps: int, batch: int, val_batches: int, eval_batch: int
) -> list[str]:
    """What every arm shares: steps (``projector_steps`` of them first), batch, one validation at the
    end on the same ``val_batches`` batches of ``eval_batch`` queries."""
    return [
        f"trainer.max_steps={steps}",
        f"model.saliency.projector_steps={projector_steps}",
        f"trainer.val_check_interval={steps}",
        "trainer.num_sanity_val_steps=0",
        f"data.batch_size={batch}",
        f"trainer.limit_val_batches={val_batches}",
        f"data.eval_batch_size={eval_batch}",
    ]


def arm_figures(overrides: list[str], out: Path) -> dict[str, float]:
    """One run's wall seconds, scores and prior (from its metrics.json)."""
    figures = run_once(overrides, profile=False, keep=out)
    metrics = json.loads((out / "metrics.json").read_text())
    scores = {name: metrics.get(key, math.nan) for name, key in SCORES.items()}
    return {**scores, "wall_s": figures["wall_s"], "prior_mIoU": figures["prior_mIoU"]}


def differences(arms: dict[str, dict[str, float]]) -> dict[str, float]:
    """The comparisons between arms that ran (mIoU points; wall ratios)."""
    found: dict[str, float] = {}
    if "pretrained" in arms:
        pretrained = arms["pretrained"]
        found["pretrained_minus_prior_mIoU"] = pretrained["test_mIoU"] - pretrained["prior_mIoU"]
        for other in ("scratch", "tiny"):
            if other in arms:
                found[f"pretrained_minus_{other}_mIoU"] = pretrained["test_mIoU"] - arms[other]["test_mIoU"]
                found[f"wall_ratio_pretrained_vs_{other}"] = pretrained["wall_s"] / arms[other]["wall_s"]
    if "scratch" in arms:
        found["scratch_minus_prior_mIoU"] = arms["scratch"]["test_mIoU"] - arms["scratch"]["prior_mIoU"]
    return found


def parse_sets(items: list[str]) -> dict[str, list[str]]:
    """``ARM=overrides`` options as overrides per arm."""
    extra: dict[str, list[str]] = {}
    for item in items:
        arm, _, overrides = item.partition("=")
        if arm not in ARMS:
            sys.exit(f"error: --set {item}: no arm {arm!r}; arms: {', '.join(ARMS)}")
        extra.setdefault(arm, []).extend(shlex.split(overrides))
    return extra


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 steps on a small data set: a smoke test")
    parser.add_argument(
        "--steps",
        type=at_least_one,
        help="training steps of every arm, projector steps included (default: experiment=smollm2's)",
    )
    parser.add_argument(
        "--projector-steps",
        type=at_least(0),
        help="of --steps, how many train the projector alone first (default: experiment=smollm2's)",
    )
    parser.add_argument(
        "--batch", type=at_least_one, help="batch size of every arm (default: experiment=smollm2's)"
    )
    parser.add_argument(
        "--arms", default=",".join(ARMS), help=f"which arms to run (default: {','.join(ARMS)})"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="ARM=OVERRIDES", help="more overrides of one arm"
    )
    parser.add_argument("--keep", type=new_folder, help="write the runs to <keep>/<arm> and keep them")
    args = parser.parse_args(argv)
    chosen = [arm for arm in args.arms.split(",") if arm]
    if unknown := [arm for arm in chosen if arm not in ARMS]:
        sys.exit(f"error: --arms: no arm {unknown[0]!r}; arms: {', '.join(ARMS)}")
    smollm2 = load_config(["experiment=smollm2"])  # the default budget
    steps = args.steps or (2 if args.quick else smollm2.trainer.max_steps)
    batch = args.batch or (2 if args.quick else smollm2.data.batch_size)
    projector_steps = args.projector_steps
    if projector_steps is None:
        projector_steps = 0 if args.quick else smollm2.model.saliency.projector_steps
    if projector_steps >= steps:
        parser.error(
            f"--steps {steps} leaves no step for the LM after {projector_steps} projector steps "
            "(--projector-steps, default experiment=smollm2's): give fewer projector steps or more steps"
        )
    if (reason := missing_model(SMOLLM2)) is not None:
        sys.exit(f"error: {SMOLLM2}: {reason}")
    extra = parse_sets(args.set)
    validation = (smollm2.trainer.limit_val_batches, smollm2.data.eval_batch_size)
    shared = equal_budget(steps, projector_steps, batch, *validation)
    shared += QUICK if args.quick else []

    print(f"machine: {machine()}", flush=True)
    arms: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        for arm in chosen:
            overrides = [*ARMS[arm], *shared, *extra.get(arm, [])]
            print(f"{arm}: python train.py {shlex.join(overrides)}", flush=True)
            arms[arm] = arm_figures(overrides, root / arm)
    print(f"machine after: {machine()}")
    print(
        f"\n| arm | test mIoU | R1@0.7 | parse_fail % | wall s |  ({steps} steps, {projector_steps} of them projector steps, batch {batch})"
    )
    print("|---|---|---|---|---|")
    for arm, scores in arms.items():
        row = (scores[name] for name in ("test_mIoU", "test_R1@0.7", "test_parse_fail", "wall_s"))
        print(f"| {arm} | " + " | ".join(f"{value:.2f}" for value in row) + " |")
    first = next(iter(arms.values()))
    print(f"| prior (best constant segment) | {first['prior_mIoU']:.2f} | | | |\n", flush=True)
    figures: dict[str, float] = {"steps": steps, "batch": batch}
    for arm, scores in arms.items():
        figures |= {f"{arm}_{name}": value for name, value in scores.items() if name != "prior_mIoU"}
    figures["prior_mIoU"] = first["prior_mIoU"]
    print_figures(figures | differences(arms))


if __name__ == "__main__":
    main()
