"""How cost grows: training-step time and activation memory vs sequence length, decoding time vs K.

    python -m bench.scaling                 # frames per token 1/2/4 x K = 0..3, default model
    python -m bench.scaling --quick         # experiment=tiny, fewer configurations, no plot

Each configuration (``projector.frames_per_token`` f, ``model.refine.steps`` K; aux head on when
K > 0) gets its own default-sized model and the same training batches (batch 32); the
configurations take turns for ``--rounds`` rounds, and every time is a ratio to the default's
(``DEFAULT``: f = 4, K = 3) in the same round. Memory is what the step saves for backward (activations, summed
over distinct storages through ``torch.autograd.graph.saved_tensors_hooks``): the part of a step's
peak that grows with the sequence; weights, gradients and AdamW's two moments are a constant
``static_mb`` on top. Decoding: constrained, batch 32, per query, the default's f, relative to K = 0.

Prints the growth exponents (slope of log cost vs log L, L = tokens per sequence: 1 is linear,
2 quadratic) of step time and activation memory, ``activation_mb_per_token`` (linear fit), a
table (stdout) and ``bench/figures/scaling.png``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from bench.figures_out import machine, print_figures
from grounding.answer_format.targets import RefineSchedule
from lightning_modules.grounding_module import GroundingModule
from lightning_modules.projector import ProjectorSpec
from timerefine.pipeline.arguments import at_least_one
from timerefine.pipeline.build import build_datamodule, build_module
from timerefine.pipeline.config import load_config

FIGURE = Path(__file__).with_name("figures") / "scaling.png"
DEFAULT = (ProjectorSpec().frames_per_token, RefineSchedule().steps)  # the default run's (f, K)


def saved_bytes(module: GroundingModule, batch: dict) -> tuple[int, float]:
    """Bytes of activations saved for backward by one training step (distinct storages; the weights a
    step saves are counted in :func:`static_bytes`), and its loss."""
    weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = module._losses(batch)["loss"]
    loss.backward()
    module.zero_grad(set_to_none=True)
    return sum(storages.values()), float(loss)


def static_bytes(module: GroundingModule) -> int:
    """Weights, gradients and AdamW's two moments of the trainable parameters."""
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    trainable = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    return weights + 3 * trainable


def setup(frames_per_token: int, k: int, extra: list[str], batches: int) -> dict:
    overrides = [
        f"model.projector.frames_per_token={frames_per_token}",
        f"model.refine.steps={k}",
        f"model.aux.weight={1.0 if k else 0.0}",
        *extra,
    ]
    cfg = load_config(overrides)
    torch.manual_seed(cfg.seed)
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    module = build_module(cfg, datamodule)
    loader = iter(datamodule.train_dataloader())
    train = [next(loader) for _ in range(batches)]
    items = [datamodule.datasets["test"][(0, i)] for i in range(cfg.data.batch_size)]
    return {
        "module": module,
        "optimizer": torch.optim.AdamW(module.parameters(), lr=1e-4),
        "train": train,
        "test": datamodule.collator(items),
        "tokens": train[0]["input_ids"].shape[1],
    }


def train_steps(run: dict) -> None:
    module, optimizer = run["module"].train(), run["optimizer"]
    for batch in run["train"]:
        module._losses(batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()


def decode(run: dict) -> None:
    run["module"].eval().predict_batch(run["test"])


def timed(fn, run: dict) -> float:
    start = time.perf_counter()
    fn(run)
    return time.perf_counter() - start


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for f in sorted({r["f"] for r in rows}):
        mine = sorted((r for r in rows if r["f"] == f), key=lambda r: r["tokens"])
        left.plot(
            [r["tokens"] for r in mine], [r["step_ratio"] for r in mine], "o-", label=f"{f} frames/token"
        )
        right.plot(
            [r["tokens"] for r in mine], [r["activation_mb"] for r in mine], "o-", label=f"{f} frames/token"
        )
    left.set(xlabel="tokens per sequence", ylabel="train step time / default's", title="step time (K = 0..3)")
    right.set(
        xlabel="tokens per sequence", ylabel="MB saved for backward", title="activation memory, batch 32"
    )
    left.legend()
    right.legend()
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=100)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line's options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=at_least_one, default=3)
    parser.add_argument(
        "--steps", type=at_least_one, default=2, help="training steps per configuration a round"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="experiment=tiny, f = 1/default, K = 0/default, one round, --no-plot",
    )
    parser.add_argument("--no-plot", action="store_true", help=f"do not replace {FIGURE}")
    args = parser.parse_args(argv)
    args.no_plot |= args.quick  # a smoke test's figure is not the published one
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    extra = ["experiment=tiny"] if args.quick else []
    frames, ks = ((1, DEFAULT[0]), (0, DEFAULT[1])) if args.quick else ({1, 2, 4}, {0, 1, 2, 3})
    frames, ks = sorted({*frames, DEFAULT[0]}), sorted({*ks, DEFAULT[1]})
    rounds, steps = (1, 1) if args.quick else (args.rounds, args.steps)
    print(f"machine: {machine()}")
    runs = {(f, k): setup(f, k, extra, steps) for f in frames for k in ks}
    for run in runs.values():  # warm-up: first calls allocate
        train_steps(run)
        decode(run)
    step_s: dict[tuple[int, int], list[float]] = {key: [] for key in runs}
    decode_s: dict[int, list[float]] = {k: [] for k in ks}
    for _ in range(rounds):
        for key, run in runs.items():
            step_s[key].append(timed(train_steps, run) / steps)
            if key[0] == DEFAULT[0]:
                decode_s[key[1]].append(timed(decode, run))
    rows = []
    for (f, k), run in runs.items():
        ratios = [a / b for a, b in zip(step_s[(f, k)], step_s[DEFAULT], strict=True)]
        activation, _ = saved_bytes(run["module"].train(), run["train"][0])
        rows.append(
            {
                "f": f,
                "K": k,
                "tokens": run["tokens"],
                "step_ratio": statistics.median(ratios),
                "step_s": statistics.median(step_s[(f, k)]),
                "activation_mb": activation / 2**20,
            }
        )
    print("| frames/token | K | tokens | train step / default's | s/step here | MB saved for backward |")
    print("|---|---|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (r["f"], r["K"])):
        print(
            f"| {r['f']} | {r['K']} | {r['tokens']} | {r['step_ratio']:.2f} | {r['step_s']:.3f} "
            f"| {r['activation_mb']:.1f} |"
        )
    decode_ratio = {
        k: statistics.median(a / b for a, b in zip(decode_s[k], decode_s[ks[0]], strict=True)) for k in ks
    }
    print("| K | decoding time per query / K=0's |")
    print("|---|---:|")
    for k, ratio in decode_ratio.items():
        print(f"| {k} | {ratio:.2f} |")
    tokens = np.array([r["tokens"] for r in rows], dtype=float)
    memory = np.array([r["activation_mb"] for r in rows])
    time_exponent = np.polyfit(np.log(tokens), np.log([r["step_ratio"] for r in rows]), 1)[0]
    memory_exponent = np.polyfit(np.log(tokens), np.log(memory), 1)[0]
    per_token = np.polyfit(tokens, memory, 1)[0]
    if not args.no_plot:
        plot(rows, FIGURE)
        print(f"plot: {FIGURE}")
    static = static_bytes(runs[DEFAULT]["module"]) / 2**20
    print(f"machine after: {machine()}")
    figures: dict[str, float] = {
        "step_time_exponent": float(time_exponent),
        "activation_memory_exponent": float(memory_exponent),
        "activation_mb_per_token": float(per_token),
        "static_mb": static,
    }
    for r in rows:
        figures[f"step_ratio_f{r['f']}_K{r['K']}"] = r["step_ratio"]
        figures[f"activation_mb_f{r['f']}_K{r['K']}"] = r["activation_mb"]
    figures |= {f"decode_ratio_K{k}": v for k, v in decode_ratio.items()}
    print_figures(figures)


if __name__ == "__main__":
    main()
