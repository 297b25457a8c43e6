"""Evaluation decoding vs Hugging Face ``generate()`` on the same model and prompts.

    python -m bench.decoding                          # default model (random init), K = 0, 1, 3
    python -m bench.decoding --run runs/default       # and each lever's effect on that run's test mIoU
    python -m bench.decoding --compile                # also HF generate with a static cache, compiled
    python -m bench.decoding --quick                  # experiment=tiny, seconds
    python -m bench.decoding --experiment smollm2     # SmolLM2-135M (pretrained LM, random projector)

Decoders (greedy, KV cache; batch 1 = queries one at a time, batch 32 = one left-padded batch):

- ``constrained``: this project's constrained decoding (``generation.generate`` with the codec's
  slots): a forward pass per chosen digit or sign, the fixed text riding along with it;
- ``constrained_eager``: the same answers, one pass per chosen token and one per run of fixed
  text: the project before this benchmark -- the "fewer passes" lever;
- ``constrained_static``: ``constrained`` on a static KV cache (preallocated, written in place)
  instead of Hugging Face's DynamicCache (grown by concatenation) -- the "static KV cache" lever;
- ``adaptive``: constrained, but a query stops refining once a step's offsets are ``+00 and +00``:
  the rest of the layout is filled in without the model (that segment, zero offsets), and the
  query leaves the batch (its rows of the cache dropped) -- the "adaptive refinement depth" lever;
- ``constrained_rows_unmerged``: ``constrained`` without merging the trained token rows into the LM
  first (every other decoder runs as evaluation does, merged: ``GroundingModule.decoding``), so peft
  copies the embedding matrix on every forward pass -- the "merged token rows" lever
  (``speedup_rows_merged``; 1 where nothing trains token rows, as in the tiny LM);
- ``free``: this project's free greedy decoding;
- ``hf_greedy``: ``model.lm.generate(inputs_embeds=...)`` (``hf_generation.hf_generate``), greedy
  with its dynamic KV cache;
- ``hf_constrained``: the same with ``SlotLogitsProcessor`` allowing only what the layout allows
  next (``model.inference.decoder=generate``);
- ``hf_static_compiled`` (``--compile``): ``hf_greedy`` with ``cache_implementation="static"`` and
  its decoding step compiled (``CompileConfig``, allowed on CPU).

A random-init model never emits EOS on cue, so without ``--run`` free decoding runs exactly the
answer's length plus its EOS (what a trained model writes), and answers are checked identical where
they must be: constrained = constrained_eager = hf_constrained, free = hf_greedy (``match_*``
figures, share of queries). Timing: decoders take turns for ``--rounds`` rounds; queries/s from the
median round, a speed-up the median of the rounds' ratios. Prints ``speedup_vs_hf_generate``
(constrained vs hf_constrained, K=3, batch 32; target >= 2), queries/s and forward passes per query for every decoder, K and batch size, and
with ``--run`` the trained model's test mIoU and queries/s per decoder, and how often adaptive
decoding stopped early (``adaptive_tol1``: offsets within one frame of zero count as zero).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch
from transformers import CompileConfig
from transformers.utils import logging as hf_logging

from bench.arguments import run_folder
from bench.decoding_levers import (
    DecoderRun,
    EagerDecoder,
    adaptive,
    constrained_with,
    project_generate,
    static_cache_decoder,
)
from bench.figures_out import interleaved, machine, median_ratio, print_figures
from grounding.answer_format.predictions import seconds
from grounding.metrics.grounding import GroundingMetric
from grounding.metrics.windows import metric_inputs
from lightning_modules.generation import Generation
from lightning_modules.grounding_module import GroundingModule
from lightning_modules.hf_generation import hf_generate
from timerefine.pipeline.arguments import at_least, at_least_one
from timerefine.pipeline.build import build_datamodule, build_module
from timerefine.pipeline.config import load_config, load_run_config


def hf_run(module: GroundingModule, batch: dict, *, constrained: bool, budget: int, eos_id: int, **options) -> Generation:  # fmt: skip
    """``model.inference.decoder=generate`` on a test batch (its aux state too)."""
    return hf_generate(
        module.model, batch["prompt_ids"], batch["prompt_mask"], batch["features"], eos_id, budget,
        slots=module.codec.slots() if constrained else None,
        offset_id=module.offset_id if module.model.aux_head is not None else None,
        **options,
    )  # fmt: skip


def as_evaluated(run: DecoderRun) -> DecoderRun:
    """``run`` as evaluation runs a decoder: with the trained token rows merged into the LM."""

    def merged(module: GroundingModule, batch: dict) -> Generation:
        with module.decoding():
            return run(module, batch)

    return merged


def decoders(module: GroundingModule, trained: bool, compile_step: bool) -> dict[str, DecoderRun]:
    """The decoders to compare. A random-init model gets no EOS: free decoding runs the answer's
    length plus one token, as a trained model's answer and its EOS."""
    eos = module.codec.end_id
    budget = module.codec.answer_length() + (8 if trained else 1)
    free_eos = eos if trained else -1
    runs: dict[str, DecoderRun] = {
        "constrained": lambda m, b: project_generate(m, b, True, eos, budget),
        "constrained_static": constrained_with(static_cache_decoder(module.codec.answer_length())),
        "constrained_eager": constrained_with(EagerDecoder),
        "adaptive": lambda m, b: adaptive(m, b)[0],
        "adaptive_tol1": lambda m, b: adaptive(m, b, tolerance=1)[0],
        "free": lambda m, b: project_generate(m, b, False, free_eos, budget),
        "hf_greedy": lambda m, b: hf_run(m, b, constrained=False, budget=budget, eos_id=free_eos),
        "hf_constrained": lambda m, b: hf_run(m, b, constrained=True, budget=budget, eos_id=eos),
    }
    runs = {name: as_evaluated(run) for name, run in runs.items()}
    runs["constrained_rows_unmerged"] = lambda m, b: project_generate(m, b, True, eos, budget)
    if compile_step:
        config = CompileConfig(dynamic=False, mode="default")
        config._compile_all_devices = True  # CompileConfig's flag for compiling off GPU
        runs["hf_static_compiled"] = lambda m, b: hf_run(
            m, b, constrained=False, budget=budget, eos_id=free_eos,
            cache_implementation="static", compile_config=config,
        )  # fmt: skip
    return runs


# ---- measuring -----------------------------------------------------------------------------------


class PassCounter:
    """Counts the LM's forward passes (a forward pre-hook)."""

    def __init__(self, module: GroundingModule) -> None:
        self.count = 0
        module.model.lm.register_forward_pre_hook(self._hook)

    def _hook(self, *_) -> None:
        self.count += 1


def speed(module: GroundingModule, batches: list[dict], runs: dict[str, DecoderRun], rounds: int) -> dict:
    """Queries/s and forward passes per query of each decoder, and which answers agree."""
    counter, answers, passes = PassCounter(module), {}, {}
    for name, run in runs.items():  # warm-up, answers and passes
        counter.count = 0
        answers[name] = [row for b in batches for row in run(module, b).tokens]
        passes[name] = counter.count / len(batches)
    seconds = interleaved({n: (lambda r=r: [r(module, b) for b in batches]) for n, r in runs.items()}, rounds)
    queries = sum(len(b["records"]) for b in batches)
    out = {
        n: {"qps": queries / statistics.median(s), "passes": passes[n], "seconds": s}
        for n, s in seconds.items()
    }
    for a, b in (
        ("constrained", "constrained_eager"),
        ("constrained", "hf_constrained"),
        ("constrained", "constrained_rows_unmerged"),
        ("free", "hf_greedy"),
    ):
        same = sum(x == y for x, y in zip(answers[a], answers[b], strict=True))
        out[f"match_{a}_{b}"] = same / len(answers[a])
    return out


TOLERANCES = {"adaptive": 0, "adaptive_tol1": 1}


def quality(module: GroundingModule, loader, runs: dict[str, DecoderRun]) -> dict[str, float]:
    """Per decoder on the trained model's test split: mIoU (scored as the run's test is: its final
    answer choice and ``eval.protocol``), queries/s (decoders take turns on each batch) and, for
    adaptive decoding, the share of queries that stopped early and the rounds skipped."""
    protocol = module.metrics["test"].protocol
    metrics = {name: GroundingMetric(protocol=protocol) for name in runs}
    seconds_taken = dict.fromkeys(runs, 0.0)
    skipped: dict[str, list[int]] = {name: [] for name in runs if name in TOLERANCES}
    for batch in loader:
        for name, run in runs.items():
            start = time.perf_counter()
            if name in TOLERANCES:
                with module.decoding():
                    generation, skips = adaptive(module, batch, TOLERANCES[name])
                skipped[name] += skips
            else:
                generation = run(module, batch)
            seconds_taken[name] += time.perf_counter() - start
            finals = [
                seconds(prediction.final, record.duration, module.timeline, module.inference.order_and_clip)
                for record, prediction in zip(batch["records"], module.parse(generation), strict=True)
            ]
            metrics[name].update(*metric_inputs(finals, batch["records"]))
    out: dict[str, float] = {}
    print(
        "| decoder (trained model, test split) | test mIoU | queries/s | queries stopped early | rounds skipped per query |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, metric in metrics.items():
        scores = metric.compute()
        out[f"test_mIoU_{name}"] = scores["mIoU"]
        out[f"test_qps_{name}"] = scores["count"] / seconds_taken[name]
        stopped = rounds = math.nan
        if name in skipped:
            stopped = sum(s > 0 for s in skipped[name]) / len(skipped[name])
            rounds = statistics.mean(skipped[name])
            out[f"{name}_stopped_early"], out[f"{name}_rounds_skipped"] = stopped, rounds
        print(
            f"| {name} | {out[f'test_mIoU_{name}']:.2f} | {out[f'test_qps_{name}']:.1f} | {stopped:.3f} | {rounds:.2f} |"
        )
    return out


def trained_model(run_dir: Path) -> tuple[GroundingModule, object]:
    """A run's best checkpoint in eval mode, and its datamodule."""
    from timerefine.pipeline.best_checkpoint import recorded_best

    cfg = load_run_config(run_dir, [])
    datamodule = build_datamodule(cfg, tokenizer_dir=run_dir / "tokenizer")
    datamodule.setup()
    module = build_module(cfg, datamodule)
    state = torch.load(recorded_best(run_dir / "checkpoints"), map_location="cpu", weights_only=False)
    module.on_load_checkpoint(state)  # a pretrained base's frozen weights, left out of the checkpoint
    module.load_state_dict(state["state_dict"])
    return module.eval(), datamodule


def random_model(k: int, extra: list[str]) -> tuple[GroundingModule, object]:
    cfg = load_config([f"model.refine.steps={k}", f"model.aux.weight={1.0 if k else 0.0}", *extra])
    torch.manual_seed(cfg.seed)
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    return build_module(cfg, datamodule).eval(), datamodule


def test_batches(datamodule, size: int, count: int) -> list[dict]:
    items = [datamodule.datasets["test"][(0, i)] for i in range(size * count)]
    return [datamodule.collator(items[i * size : (i + 1) * size]) for i in range(count)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=run_folder, help="a trained run: decode its test split with each lever")
    parser.add_argument("--refine-steps", type=at_least(0), nargs="+", default=[0, 1, 3])
    parser.add_argument("--rounds", type=at_least_one, default=3)
    parser.add_argument(
        "--singles", type=at_least(0), default=8, help="queries decoded one at a time (0: none)"
    )
    parser.add_argument("--compile", action="store_true", help="also HF generate, static cache, compiled")
    parser.add_argument("--quick", action="store_true", help="experiment=tiny, one round")
    parser.add_argument(
        "--experiment", help="the random-init models start from this experiment (e.g. smollm2)"
    )
    parser.add_argument("overrides", nargs="*", help="more overrides of the random-init models")
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()  # generate() warns at every call that EOS -1 never comes
    extra = ["experiment=tiny"] if args.quick else []
    extra += [f"experiment={args.experiment}"] if args.experiment else []
    extra += args.overrides
    rounds, singles, batch_size = (
        (1, min(args.singles, 2), 4) if args.quick else (args.rounds, args.singles, 32)
    )
    print(f"machine: {machine()}")
    print("| K | batch | decoder | queries/s | forward passes per query |")
    print("|---|---|---|---:|---:|")
    figures: dict[str, float] = {}
    seconds: dict[str, dict[str, list[float]]] = {}  # per K and batch size, each decoder's rounds
    for k in args.refine_steps:
        module, datamodule = random_model(k, extra)
        if (held := len(datamodule.datasets["test"])) < max(singles, batch_size):  # before: an IndexError
            parser.error(
                f"the test split holds {held} queries; a batch of {batch_size} (fixed; 4 with --quick) and "
                f"--singles {singles} need more"
            )
        runs = decoders(module, trained=False, compile_step=args.compile)
        for size, batches in ((1, test_batches(datamodule, 1, singles)),
                              (batch_size, test_batches(datamodule, batch_size, 1))):  # fmt: skip
            if not batches:  # --singles 0: batch 1 left out
                continue
            result = speed(module, batches, runs, rounds)
            seconds[f"K{k}_b{size}"] = {name: result[name]["seconds"] for name in runs}
            for name in runs:
                qps, passes = result[name]["qps"], result[name]["passes"]
                print(f"| {k} | {size} | {name} | {qps:.1f} | {passes:.0f} |", flush=True)
                figures[f"qps_K{k}_b{size}_{name}"] = qps
                figures[f"passes_K{k}_b{size}_{name}"] = passes
            figures |= {f"{n}_K{k}_b{size}": v for n, v in result.items() if n.startswith("match_")}
    top = seconds[f"K{max(args.refine_steps)}_b{batch_size}"]
    figures = {
        f"speedup_{name}": median_ratio(top[reference], top["constrained"])
        for name, reference in (
            ("vs_hf_generate", "hf_constrained"),
            ("vs_hf_greedy", "hf_greedy"),
            ("vs_eager", "constrained_eager"),
            ("rows_merged", "constrained_rows_unmerged"),
        )
    } | figures
    if args.run:
        module, datamodule = trained_model(args.run)
        runs = decoders(module, trained=True, compile_step=False)
        runs = {n: run for n, run in runs.items() if n != "constrained_static"}
        figures |= quality(module, datamodule.test_dataloader(), runs)
    print(f"machine after: {machine()}")
    print_figures(figures)


if __name__ == "__main__":
    main()
