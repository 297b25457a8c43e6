"""Digit-by-digit vs canonical answer tokens (``model.answer_tokens``) with the real tokenizers.

    python -m bench.experiments.answer_tokens                          # answer lengths, decoding time
    python -m bench.experiments.answer_tokens --train gpt2 --steps 200 # and a training run per spelling
    python -m bench.experiments.answer_tokens --train gpt2 --steps 300 --overrides model=direct

For each tokenizer of ``../shared/data/tokenizers``: the K=3 answer length in tokens in both
spellings, and the constrained decoding time per query of the same tiny LM (built-in data, one
batch, the median of ``--repeats`` interleaved rounds) in both, measured in this invocation; their
ratio (the median of the rounds' ratios) is what carries over to another machine. ``--train NAME`` adds one ``train.py`` run per spelling
with that tokenizer (one at a time, ``--overrides`` added) and its test mIoU. The ``name=value``
lines come last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.figures_out import interleaved, machine, median_ratio, print_figures
from grounding.answer_format.codec import ANSWER_TOKENS
from timerefine.pipeline.build import build_datamodule, build_module
from timerefine.pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[2]
TOKENIZERS = ROOT.parent / "shared" / "data" / "tokenizers"
NAMES = ("llama2_spm", "llama3_bpe", "qwen2", "gpt2")
# A small default model and data: the tiny LM at hidden 64 with 2 layers, 20 frames (10 video tokens).
SMALL = [
    "data.source.num_frames=20",
    "model.lm.tiny.hidden_size=64",
    "model.lm.tiny.intermediate_size=256",
    "model.lm.tiny.num_layers=2",
]
# The training comparison: batch 16, a higher lr with a short warm-up, 100 val / 300 test queries.
TRAIN = [
    "data.batch_size=16",
    "model.optim.lr=2e-3",
    "model.optim.warmup_steps=20",
    "data.source.num_val=100",
    "data.source.num_test=300",
    "model.saliency.projector_steps=0",  # as measured (before projector steps)
    "callbacks.progress_bar=none",
]


def decoding(name: str, queries: int, repeats: int) -> tuple[dict[str, tuple[int, float]], float]:
    """Per spelling: the K=3 answer length and the constrained decoding ms/query (median round) of
    the same (untrained) model on the same batch; and canonical's time over digits' (median ratio)."""
    modules, batches = {}, {}
    for mode in ANSWER_TOKENS:
        cfg = load_config(
            [*SMALL, f"model.lm.tokenizer={TOKENIZERS / name}", f"model.answer_tokens={mode}", "seed=0"]
        )
        datamodule = build_datamodule(cfg)
        datamodule.setup("validate")
        torch.manual_seed(0)
        modules[mode] = build_module(cfg, datamodule).eval()
        batches[mode] = datamodule.collator([datamodule.datasets["val"][(0, i)] for i in range(queries)])
        modules[mode].predict_batch(batches[mode])  # warm-up
    seconds = interleaved(
        {mode: (lambda m=mode: modules[m].predict_batch(batches[m])) for mode in ANSWER_TOKENS}, repeats
    )
    measured = {
        mode: (modules[mode].codec.answer_length(), statistics.median(seconds[mode]) * 1000 / queries)
        for mode in ANSWER_TOKENS
    }
    return measured, median_ratio(seconds["canonical"], seconds["digits"])


def train_run(name: str, mode: str, steps: int, out: Path, extra: list[str]) -> dict[str, float]:
    """One ``train.py`` run: its test and val mIoU and wall-clock seconds."""
    output_dir = out / f"{name}_{mode}"
    overrides = [
        *SMALL,
        f"model.lm.tokenizer={TOKENIZERS / name}",
        f"model.answer_tokens={mode}",
        *TRAIN,
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps // 2}",
        *extra,
        f"output_dir={output_dir}",
    ]
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "train.py", *overrides], cwd=ROOT, capture_output=True, text=True
    )
    if result.returncode:
        sys.exit(f"train.py {' '.join(overrides)} failed:\n{result.stderr[-3000:]}")
    metrics = json.loads((output_dir / "metrics.json").read_text())
    return {
        "test_mIoU": metrics["test/mIoU"],
        "val_mIoU": metrics["val/mIoU"],
        "wall_s": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queries", type=int, default=32, help="queries in the timed decoding batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train", choices=NAMES, help="also train once per spelling with this tokenizer")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--overrides", nargs="*", default=[], help="more train.py overrides")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_answer_tokens")
    args = parser.parse_args()
    if not TOKENIZERS.is_dir():
        sys.exit(f"error: no tokenizers at {TOKENIZERS}")
    torch.set_num_threads(1)
    print(f"machine: {machine()}", flush=True)
    results: dict[str, float] = {}
    for name in NAMES:
        measured, ratio = decoding(name, args.queries, args.repeats)
        for mode, (length, ms) in measured.items():
            results[f"{name}_{mode}_answer_tokens"] = length
            results[f"{name}_{mode}_decode_ms_per_query"] = ms
        results[f"{name}_canonical_over_digits_decode_time"] = ratio
    if args.train:
        for mode in ANSWER_TOKENS:
            for key, value in train_run(args.train, mode, args.steps, args.out, args.overrides).items():
                results[f"{args.train}_{mode}_{key}"] = value
    print(f"machine after: {machine()}")
    print_figures(results)


if __name__ == "__main__":
    main()
