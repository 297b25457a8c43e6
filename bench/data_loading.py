"""Feature loading throughput: FolderFeatureStore vs PackedFeatureStore, alone and through a DataLoader.

    python -m bench.data_loading [--videos 2000] [--workers 0 2] [--no-write]
    python -m bench.data_loading --quick      # 200 videos, no worker processes, RESULTS.md untouched

Writes ``--videos`` random float16 ``(num_frames, feature_dim)`` files to a temporary folder, packs
them with ``timerefine/tools/pack_features.py``, then times shuffled epochs of ``store.load`` (float32 out):
a plain loop, and a torch DataLoader per worker count. Configurations take turns for three rounds
(best round kept) so that load from other jobs hits them alike. The ``## Data loading`` section of
``bench/RESULTS.md`` is updated. Files were just written: this is a warm page cache, not disk speed.
Target: a DataLoader feeds at least 160 samples/s (batch 32 at 5 steps/s, a 7B Video LLM's upper
end); prints ``slowest_loader_samples_per_s`` and ``headroom_over_need`` (that / 160) last.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from bench.figures_out import cpu_name, print_figures
from datamodules.feature_stores import FolderFeatureStore, PackedFeatureStore
from grounding.records import FeatureStore
from timerefine.pipeline.arguments import at_least, at_least_one
from timerefine.tools.pack_features import pack_folder

RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "## Data loading"
ROUNDS = 3
NEED = 160  # samples/s: batch 32 at 5 steps/s


class StoreDataset(Dataset):
    def __init__(self, store: FeatureStore, video_ids: list[str]) -> None:
        self.store, self.video_ids = store, video_ids

    def __len__(self) -> int:
        return len(self.video_ids)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.store.load(self.video_ids[i]))


def epochs(store: FeatureStore, video_ids: list[str], workers: list[int], batch_size: int) -> dict:
    """Per configuration, a function running one shuffled epoch and returning the samples seen."""
    dataset = StoreDataset(store, video_ids)
    order = random.Random(0).sample(range(len(dataset)), len(dataset))
    runs: dict[str, Callable[[], int]] = {
        "load() only": lambda: sum(1 for i in order if dataset[i] is not None)
    }
    for w in workers:
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=True,
            num_workers=w,
            persistent_workers=w > 0,
            generator=torch.Generator().manual_seed(0),
        )
        runs[f"{w} workers"] = lambda loader=loader: sum(len(batch) for batch in loader)
    return runs


def stack_ms(args: argparse.Namespace) -> float:
    """Milliseconds the default collate's ``torch.stack`` takes for one batch (median of 5)."""
    batch = [torch.zeros(args.num_frames, args.feature_dim) for _ in range(args.batch_size)]
    times = []
    for _ in range(5):
        start = time.perf_counter()
        torch.stack(batch)
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[2]


def update_section(text: str, body: str) -> str:
    """Replace (or append) the ``## Data loading`` section of a markdown file, leaving the rest alone."""
    section = f"{SECTION}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        return pattern.sub(lambda _: section + "\n", text, count=1).rstrip("\n") + "\n"
    head = text.rstrip("\n") or "# Benchmark results"
    return f"{head}\n\n{section}"


def report(
    results: dict[str, dict[str, float]],
    args: argparse.Namespace,
    size_mb: dict[str, float],
    argv: list[str] | None,
) -> str:
    columns = list(next(iter(results.values())))
    slowest = slowest_loader(results)
    shared = " (other jobs shared the CPUs)" if args.load > 0.5 else ""
    return "\n".join(
        [
            f"`python -m bench.data_loading {' '.join(sys.argv[1:] if argv is None else argv)}`: "
            f"{args.videos} videos of ({args.num_frames}, {args.feature_dim}) float16 features, returned as "
            f"float32; samples/s over a shuffled epoch, `load() only` = a plain loop over `store.load`, else a "
            f"torch DataLoader (batch {args.batch_size}); best of {ROUNDS} interleaved rounds, warm page "
            f"cache. Machine: {cpu_name()}, {os.cpu_count()} CPUs, Python "
            f"{platform.python_version()}, torch {torch.__version__} with {torch.get_num_threads()} intra-op "
            f"thread(s) in the main process; 1-min load average before the run "
            f"{args.load:.1f}{shared}.",
            "",
            "| store | " + " | ".join(columns) + " |",
            "|---|" + "---:|" * len(columns),
            *(
                f"| {kind} ({size_mb[kind]:.0f} MB on disk) | "
                + " | ".join(f"{row[c]:,.0f}" for c in columns)
                + " |"
                for kind, row in results.items()
            ),
            "",
            "A training step of batch B consumes B samples: B=32 at 1-5 steps/s (a 7B Video LLM) needs "
            f"32-{NEED} samples/s; the slowest DataLoader configuration measured here ({slowest:,.0f} samples/s) "
            f"is {slowest / NEED:.1f}x the upper end of that range. Cold-cache or network file-system reads "
            "are not measured here.",
            "",
            "Collating one batch (`torch.stack`) took "
            + ", ".join(f"{ms:.1f} ms with {n} torch thread(s)" for n, ms in args.stack_ms.items())
            + " in the main process: on a CPU-shared node, cap torch threads (`--threads`, `OMP_NUM_THREADS`).",
        ]
    )


def slowest_loader(results: dict[str, dict[str, float]]) -> float:
    """The lowest samples/s of any DataLoader configuration (the plain ``load()`` loop excluded)."""
    return min(rate for row in results.values() for column, rate in row.items() if column != "load() only")


def write_folder(folder: Path, video_ids: list[str], num_frames: int, feature_dim: int) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for video_id in video_ids:
        features = rng.standard_normal((num_frames, feature_dim), np.float32).astype(np.float16)
        np.save(folder / f"{video_id}.npy", features)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=at_least_one, default=2000)
    parser.add_argument("--num-frames", type=at_least_one, default=100)
    parser.add_argument("--feature-dim", type=at_least_one, default=768)
    parser.add_argument("--batch-size", type=at_least_one, default=32)
    parser.add_argument("--workers", type=at_least(0), nargs="+", default=[0, 2])
    parser.add_argument("--threads", type=at_least_one, help="torch intra-op threads in the main process")
    parser.add_argument("--no-write", action="store_true", help=f"print only, do not update {RESULTS}")
    parser.add_argument("--quick", action="store_true", help="200 videos, 0 workers, --no-write")
    args = parser.parse_args(argv)
    if args.quick:
        args.videos, args.workers, args.no_write = 200, [0], True
    args.load = os.getloadavg()[0]
    args.stack_ms = {torch.get_num_threads(): stack_ms(args)}
    if args.threads:
        torch.set_num_threads(args.threads)
        args.stack_ms[args.threads] = stack_ms(args)
    video_ids = [f"video_{i:05d}" for i in range(args.videos)]
    with tempfile.TemporaryDirectory() as tmp:
        folder, packed = Path(tmp) / "folder", Path(tmp) / "packed"
        write_folder(folder, video_ids, args.num_frames, args.feature_dim)
        start = time.perf_counter()
        pack_folder(folder, packed, args.num_frames, args.feature_dim, workers=2)
        print(f"packed {args.videos} videos in {time.perf_counter() - start:.1f} s")
        size_mb = {
            k: sum(p.stat().st_size for p in d.iterdir()) / 1e6
            for k, d in (("folder", folder), ("packed", packed))
        }
        stores = {
            "folder": FolderFeatureStore(folder, args.num_frames, args.feature_dim),
            "packed": PackedFeatureStore(packed, args.num_frames, args.feature_dim),
        }
        runs = {
            kind: epochs(store, video_ids, args.workers, args.batch_size) for kind, store in stores.items()
        }
        results = {kind: dict.fromkeys(row, 0.0) for kind, row in runs.items()}
        for round_ in range(ROUNDS):
            for kind, row in runs.items():
                for column, run in row.items():
                    start = time.perf_counter()
                    rate = run() / (time.perf_counter() - start)
                    results[kind][column] = max(results[kind][column], rate)
                    print(f"round {round_}: {kind:7s} {column:12s} {rate:8,.0f} samples/s")
    body = report(results, args, size_mb, argv)
    print(body)
    if not args.no_write:
        RESULTS.write_text(update_section(RESULTS.read_text() if RESULTS.exists() else "", body))
        print(f"updated {RESULTS}")
    slowest = slowest_loader(results)
    print_figures({"slowest_loader_samples_per_s": slowest, "headroom_over_need": slowest / NEED})


if __name__ == "__main__":
    main()
