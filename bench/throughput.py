"""Training-step and generation throughput of the default tiny Video LLM, per refinement-step count.

    python bench/throughput.py                       # CPU, the default config
    python bench/throughput.py --device cuda --overrides model.lm.dtype=bfloat16

Prints one row per K: sequence length, seconds per training step (batch 32), training tokens/s,
and milliseconds per query for constrained and free greedy decoding.
"""

from __future__ import annotations

import argparse
import time

import torch

from timerefine.pipeline.build import build_datamodule, build_module
from timerefine.pipeline.config import load_config


def measure(overrides: list[str], device: str, steps: int) -> dict[str, float]:
    cfg = load_config(overrides)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule).to(device)
    batches = iter(datamodule.train_dataloader())
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)

    def batch() -> dict:
        return module.transfer_batch_to_device(next(batches), torch.device(device), 0)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for i in range(steps + 1):
        if i == 1:  # the first step warms up
            sync()
            start = time.perf_counter()
        b = batch()
        module._losses(b)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    sync()
    step_s = (time.perf_counter() - start) / steps
    tokens = int(b["attention_mask"].sum())
    module.eval()
    decode = {}
    for constrained in (True, False):
        module.inference.constrained = constrained
        module.predict_batch(b)  # warm-up
        sync()
        start = time.perf_counter()
        module.predict_batch(b)
        sync()
        decode[constrained] = (time.perf_counter() - start) / len(b["records"]) * 1000
    return {
        "seq": b["input_ids"].shape[1],
        "step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "constrained_ms": decode[True],
        "free_ms": decode[False],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--refine-steps", type=int, nargs="+", default=[0, 1, 3])
    parser.add_argument("--overrides", nargs="*", default=[])
    args = parser.parse_args()
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(
        "| K | aux | seq len | s / train step (batch 32) | train tokens/s | ms/query constrained | ms/query free |"
    )
    print("|---|---|---|---|---|---|---|")
    for k in args.refine_steps:
        weight = 1.0 if k else 0.0
        r = measure(
            [f"model.refine.steps={k}", f"model.aux.weight={weight}", *args.overrides],
            args.device,
            args.steps,
        )
        print(
            f"| {k} | {'on' if weight else 'off'} | {r['seq']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} "
            f"| {r['constrained_ms']:.1f} | {r['free_ms']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
