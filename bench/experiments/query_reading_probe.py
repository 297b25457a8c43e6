"""How hard is reading the query on the built-in data, without a language model?

A small pointer network scores every frame from its features and its predecessor's, FiLM-scaled by
a bag-of-words embedding of the query, and is trained to point at the queried event's start frame.
Run once with the query and once with it blanked (a query-blind control): the gap is what reading
the query is worth, and the steps it takes show how quickly it can be learned.

    python -m bench.experiments.query_reading_probe --steps 1500
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn

from datamodules.builtin import BuiltinSpec, make_sample
from grounding.answer_format.prompts import normalize_query
from grounding.answer_format.timeline import MAX_INDEX


def load(spec: BuiltinSpec, split: str, videos: int) -> tuple[torch.Tensor, list[list[str]], torch.Tensor]:
    """Features (one row per query), query words, start frame index."""
    features, words, starts = [], [], []
    for index in range(videos):
        sample = make_sample(spec, split, index)
        for record in sample.records:
            features.append(torch.from_numpy(sample.features))
            words.append(normalize_query(record.query).split())
            starts.append(round(record.start / record.duration * MAX_INDEX))
    return torch.stack(features), words, torch.tensor(starts)


def bag_of_words(queries: list[list[str]], vocab: dict[str, int]) -> torch.Tensor:
    bags = torch.zeros(len(queries), len(vocab))
    for row, words in enumerate(queries):
        for word in words:
            bags[row, vocab[word]] += 1 / len(words)
    return bags


class PointerProbe(nn.Module):
    def __init__(self, vocab_size: int, feature_dim: int, hidden: int = 128) -> None:
        super().__init__()
        self.query = nn.Linear(vocab_size, hidden, bias=False)
        self.film = nn.Linear(hidden, feature_dim)
        self.score = nn.Sequential(nn.Linear(2 * feature_dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, frames: torch.Tensor, bags: torch.Tensor) -> torch.Tensor:
        gate = 1 + self.film(self.query(bags)).unsqueeze(1)
        pairs = torch.cat([frames * gate, frames.roll(1, dims=1) * gate], dim=-1)
        return self.score(pairs).squeeze(-1)  # (B, frames) logits over the start frame


def train_probe(args: argparse.Namespace, blind: bool) -> None:
    spec = BuiltinSpec(max_event_fraction=0.4, queries_per_video=args.queries_per_video)
    train_x, train_words, train_y = load(spec, "train", args.videos)
    test_x, test_words, test_y = load(spec, "test", 300)
    vocab = {w: i for i, w in enumerate(sorted({w for q in train_words + test_words for w in q}))}
    train_q, test_q = bag_of_words(train_words, vocab), bag_of_words(test_words, vocab)
    if blind:
        train_q, test_q = torch.zeros_like(train_q), torch.zeros_like(test_q)
    torch.manual_seed(0)
    probe = PointerProbe(len(vocab), spec.feature_dim)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=1e-3)
    print(f"{len(train_x)} training / {len(test_x)} test queries", flush=True)
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = torch.randint(0, len(train_x), (32,))
        loss = nn.functional.cross_entropy(probe(train_x[batch], train_q[batch]), train_y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.every == 0 or step == args.steps:
            with torch.no_grad():
                hits = (probe(test_x, test_q).argmax(-1) - test_y).abs() <= 3
            label = "query-blind" if blind else "with query"
            print(
                f"{label:<12} step {step:>5}  start within 3 frames: {100 * hits.float().mean():5.1f} %"
                f"  ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--every", type=int, default=300)
    parser.add_argument("--videos", type=int, default=4000, help="training videos")
    parser.add_argument("--queries-per-video", type=int, default=4)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for blind in (False, True):
        train_probe(args, blind)
    return 0


if __name__ == "__main__":
    sys.exit(main())
