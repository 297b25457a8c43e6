"""Framework overhead: Lightning training vs a minimal hand-written PyTorch loop, same model and batches.

    python -m bench.overhead            # the default model, 30 steps a run, 3 interleaved rounds
    python -m bench.overhead --quick    # experiment=tiny, a few seconds

Three ways to run ``--steps`` training steps of the same config, taking turns each round (so that
load from other jobs hits them alike), each on its own copy of the module, all reading the
datamodule's own train loader (collation included) and taking the same AdamW groups, LR scheduler,
gradient clipping and mixed precision (``trainer.precision`` as chosen here; bf16 autocast by default
on a CPU with bf16 instructions):

- ``raw``: ``for batch in loader: loss = module._losses(batch)["loss"]; backward; clip; step;
  schedule; zero_grad`` -- the floor;
- ``project``: ``trainer.fit`` of the Trainer ``train.py`` builds (its callbacks, CSV and
  TensorBoard loggers, logging every step's losses), validation off;
- ``bare``: ``lightning.Trainer`` with no logger, checkpointing, progress bar or model summary.

Steady-state time per step is measured from the start of step ``--warmup`` to the end of the last
step (a callback's hooks for Lightning, the same points in the raw loop), so the one-off start of
``fit`` is reported apart (``fit_startup_s``). Prints ``overhead_ratio`` (project / raw time per
step; target <= 1.05), ``bare_overhead_ratio``, samples/s of each and the start-up seconds.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch

from bench.figures_out import in_turns, machine, median_ratio, print_figures
from lightning_modules.grounding_module import GroundingModule
from timerefine.inference.run_loading import precision_plugin
from timerefine.pipeline.arguments import at_least, at_least_one
from timerefine.pipeline.build import build_datamodule, build_module, build_trainer
from timerefine.pipeline.config import load_config
from timerefine.pipeline.conventions import run_precision


class StepClock(L.Callback):
    """Seconds from the start of step ``warmup`` to the end of the last step of a fit."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, 0.0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.end = time.perf_counter()


def epochs(datamodule) -> Iterator[dict]:
    """Training batches, epoch after epoch, as a fit draws them until ``max_steps``."""
    while True:
        yield from datamodule.train_dataloader()


def raw_loop(
    module: GroundingModule,
    datamodule,
    steps: int,
    warmup: int,
    total_steps: int,
    precision: str,
    clip: float | None,
) -> float:
    """The floor: seconds for steps ``warmup..steps-1`` of a plain loop with the module's optimizer,
    under the run's mixed precision."""
    module.trainer = L.Trainer(max_steps=total_steps, logger=False)  # configure_optimizers reads it
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    module.train()
    start = 0.0
    for step, batch in enumerate(epochs(datamodule)):  # timed as StepClock times: from the
        if step == warmup:  # start of step ``warmup`` to the end of step ``steps - 1``, no fetch after it
            start = time.perf_counter()
        with precision_plugin(precision, "cpu").forward_context():
            loss = module._losses(batch)["loss"]
        loss.backward()
        if clip:  # as Lightning's gradient_clip_val: 0 or null clips nothing
            torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if step == steps - 1:
            break
    return time.perf_counter() - start


def lightning_fit(
    module: GroundingModule, datamodule, trainer: L.Trainer, clock: StepClock
) -> tuple[float, float]:
    """(steady-state seconds, seconds before the first step) of one ``trainer.fit``."""
    start = time.perf_counter()
    first: list[float] = []

    class FirstStep(L.Callback):
        def on_train_batch_start(self, *args) -> None:
            if not first:
                first.append(time.perf_counter())

    trainer.callbacks.append(FirstStep())
    trainer.fit(module, datamodule=datamodule)
    return clock.end - clock.start, first[0] - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=at_least_one, default=30)
    parser.add_argument("--warmup", type=at_least(0), default=3, help="untimed steps at the start of a run")
    parser.add_argument("--rounds", type=at_least_one, default=3)
    parser.add_argument("--quick", action="store_true", help="experiment=tiny, 12 steps, 2 rounds")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    overrides = [*(["experiment=tiny"] if args.quick else []), *args.overrides]
    steps, rounds = (12, 2) if args.quick else (args.steps, args.rounds)
    if args.warmup >= steps:  # before: no step timed, and both clocks read from 0 (a ratio of 1)
        parser.error(f"--warmup {args.warmup} leaves none of the {steps} steps to time")
    overrides += [
        f"trainer.max_steps={steps}",
        "model.saliency.projector_steps=0",  # every step a full one
        "trainer.limit_val_batches=0",
        "callbacks.progress_bar=none",
        "trainer.accelerator=cpu",  # where the plain loop runs
    ]
    cfg = load_config(overrides)
    torch.manual_seed(cfg.seed)
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    module = build_module(cfg, datamodule)
    modules = {name: copy.deepcopy(module) for name in ("raw", "project", "bare")}
    batch_size, precision = cfg.data.batch_size, run_precision(cfg).precision
    clip = cfg.trainer.gradient_clip_val
    print(f"machine: {machine()}")
    print(f"config: {' '.join(overrides)}; batch {batch_size}, {steps} steps a run, {rounds} rounds")
    seconds: dict[str, list[float]] = {name: [] for name in modules}
    startup: dict[str, list[float]] = {"project": [], "bare": []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(rounds):
            for name in in_turns(list(modules), round_):
                if name == "raw":
                    raw = raw_loop(modules["raw"], datamodule, steps, args.warmup, steps, precision, clip)
                    seconds["raw"].append(raw)
                    continue
                clock = StepClock(args.warmup)
                if name == "project":
                    trainer = build_trainer(cfg, Path(tmp) / f"{name}{round_}", modules[name])
                    trainer.callbacks.append(clock)
                else:
                    trainer = L.Trainer(
                        max_steps=steps,
                        accelerator="cpu",
                        precision=precision,
                        logger=False,
                        enable_checkpointing=False,
                        enable_progress_bar=False,
                        enable_model_summary=False,
                        limit_val_batches=0,
                        gradient_clip_val=cfg.trainer.gradient_clip_val,
                        callbacks=[clock],
                        default_root_dir=tmp,
                    )
                steady, before = lightning_fit(modules[name], datamodule, trainer, clock)
                seconds[name].append(steady)
                startup[name].append(before)
            print(
                f"round {round_}: " + ", ".join(f"{n} {s[-1]:.2f} s" for n, s in seconds.items()), flush=True
            )
    timed_steps = steps - args.warmup
    figures: dict[str, float] = {
        "overhead_ratio": median_ratio(seconds["project"], seconds["raw"]),
        "bare_overhead_ratio": median_ratio(seconds["bare"], seconds["raw"]),
    }
    for name, values in seconds.items():
        figures[f"{name}_samples_per_s"] = timed_steps * batch_size / statistics.median(values)
    for name, values in startup.items():
        figures[f"{name}_fit_startup_s"] = statistics.median(values)
    print(f"machine after: {machine()}")
    print_figures(figures)


if __name__ == "__main__":
    main()
