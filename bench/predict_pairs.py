"""``timerefine-predict`` on a pairs file of one query per video: the queries of consecutive videos
decoded together (``--batch-size``), against one video at a time, as predict decoded them before.

    python -m bench.predict_pairs --run runs/default      # the run's test queries, one per video
    python -m bench.predict_pairs --run runs/smollm2 --pairs 200
    python -m bench.predict_pairs --quick                 # experiment=tiny trained for 4 steps, 8 pairs

The first ``--pairs`` test queries of the run's data are written as feature files (``.npy``, each query
its own video) and, as the requests a pairs file makes, :func:`timerefine.tools.predict.ground_all`
answers them with ``--batch-size 1`` (the reference: one batch of one per video) and with
``--batch-size``, after an untimed batch of each, the two taking turns for ``--rounds`` rounds (who goes
first rotates). Prints ``speedup_pairs_batched`` (the median of the rounds' ratios, one at a time's
seconds over batched; no target), both arms' rates (queries/s in their median round) and test mIoUs, and
``match_answers``, the share of queries whose answer text is the same both ways (fp32: 1, a padded batch
moving floats by rounding only; under bf16 autocast a batch rounds otherwise, and near ties of the greedy
answer flip).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from functools import partial
from pathlib import Path

import numpy as np

from bench.arguments import run_folder
from bench.figures_out import interleaved, machine, median_ratio, print_figures
from grounding.metrics.windows import record_iou
from grounding.records import GroundingRecord
from timerefine import train
from timerefine.inference.grounder import Grounder, Grounding
from timerefine.inference.run_loading import dataset_examples
from timerefine.pipeline.arguments import at_least_one
from timerefine.tools.predict import Request, ground_all

QUICK = ["experiment=tiny", "trainer.max_steps=4", "trainer.val_check_interval=4", "test=false"]


def pair_requests(grounder: Grounder, count: int, folder: Path) -> list[tuple[Request, GroundingRecord]]:
    """The run's first ``count`` test queries, each with its features written to its own file."""
    pairs = []
    for number, (record, store) in enumerate(dataset_examples(grounder.run.cfg)):
        if number == count:
            break
        video = folder / f"{number:05d}.npy"
        np.save(video, np.asarray(store.load(record.video_id), dtype=np.float32))
        pairs.append((Request(video, record.query, record.duration, f"pair {number + 1}"), record))
    return pairs


def mean_iou(answers: list[Grounding], records: list[GroundingRecord]) -> float:
    """Test mIoU (%) of the answers, an unparsed one scoring 0."""
    ious = [
        0.0 if a.start is None else record_iou((a.start, a.end), r)
        for a, r in zip(answers, records, strict=True)
    ]
    return 100 * sum(ious) / len(ious)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=run_folder, help="a trained run (default with --quick: a new tiny one)")
    parser.add_argument("--pairs", type=at_least_one, default=100, help="test queries, one per video")
    parser.add_argument("--batch-size", type=at_least_one, default=32)
    parser.add_argument("--rounds", type=at_least_one, default=3)
    parser.add_argument(
        "--quick", action="store_true", help="a tiny run, its 8 test queries as pairs, 1 round"
    )
    args = parser.parse_args(argv)
    if args.run is None and not args.quick:
        parser.error("give --run (a trained run) or --quick")
    if args.batch_size == 1:  # before: the two arms were one, timed against itself
        parser.error("--batch-size 1 is the reference (one video at a time); give 2 or more")
    print(f"machine: {machine()}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        run = args.run
        if run is None:
            run = Path(scratch) / "run"
            if train.main([*QUICK, f"output_dir={run}"]) != 0:
                raise SystemExit("the quick run did not train")
        pairs, rounds = (8, 1) if args.quick else (args.pairs, args.rounds)
        grounder = Grounder.from_run(run)
        requests, records = zip(*pair_requests(grounder, pairs, Path(scratch)), strict=True)
        answers: dict[int, list[Grounding]] = {}

        def answer_all(batch_size: int) -> None:
            answers[batch_size] = [answer for _, answer in ground_all(grounder, list(requests), batch_size)]

        sizes = [1, args.batch_size]
        for size in sizes:  # untimed: the first call of each pays one-off costs
            ground_all(grounder, list(requests[:size]), size)
        seconds = interleaved({size: partial(answer_all, size) for size in sizes}, rounds)
    one, batched = answers[1], answers[args.batch_size]
    rates = {size: len(requests) / statistics.median(times) for size, times in seconds.items()}
    same = sum(a.text == b.text for a, b in zip(one, batched, strict=True))
    print(f"{len(requests)} pairs of one query per video, {rounds} round(s)")
    print(f"machine after: {machine()}")
    print_figures(
        {
            "one_video_at_a_time_queries_per_s": rates[1],
            f"batched_{args.batch_size}_queries_per_s": rates[args.batch_size],
            "one_video_at_a_time_mIoU": mean_iou(one, list(records)),
            f"batched_{args.batch_size}_mIoU": mean_iou(batched, list(records)),
            "match_answers": same / len(requests),
            "speedup_pairs_batched": median_ratio(seconds[1], seconds[args.batch_size]),
        }
    )


if __name__ == "__main__":
    main()
