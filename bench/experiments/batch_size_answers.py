"""Do greedy answers depend on the evaluation batch size or precision? (The official evaluation decodes
one query at a time in fp16; this project decodes left-padded batches, in bf16 autocast under
``experiment=reference_recipe``.)

    python -m bench.experiments.batch_size_answers                    # trains a tiny run first
    python -m bench.experiments.batch_size_answers --run runs/x       # an existing run

Evaluates the run's test split (evaluate.py, its best checkpoint) at ``data.eval_batch_size`` 1 and
``--batch`` under each precision, free and constrained decoding, and counts the answers (generated
text) that differ from batch 1 at the same precision and from batch 1 at the first of ``--precisions``
(fp32 by default; ``--precisions 32 16-mixed`` on a GPU measures the official fp16). The ``name=value``
lines come last.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench.figures_out import machine
from timerefine import evaluate, train

TINY_RUN = [  # a small model that learns in minutes on 2 CPU cores
    "experiment=tiny",
    "data.source.num_train=512",
    "data.source.num_test=64",
    "model.lm.tiny.hidden_size=64",
    "model.lm.tiny.num_layers=2",
    "model.lm.tiny.intermediate_size=256",
    "trainer.max_steps=400",
    "trainer.val_check_interval=200",
]


def answers(run: Path, name: str, overrides: list[str]) -> list[str]:
    assert evaluate.main([str(run), "--name", name, *overrides]) == 0
    rows = (run / "eval" / name / "predictions" / "test.jsonl").read_text().splitlines()
    return [json.loads(row)["text"] for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, help="a trained run (default: train a tiny one)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument(
        "--precisions", nargs="+", default=["32", "bf16-mixed"], help="the first is the reference"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        run = args.run or Path(folder) / "run"
        if args.run is None:
            assert train.main([*TINY_RUN, f"output_dir={run}"]) == 0
        figures = {}
        for constrained in ("false", "true"):
            texts = {
                (precision, batch): answers(
                    run,
                    f"b{batch}_{precision}_{constrained}",
                    [
                        f"data.eval_batch_size={batch}",
                        f"trainer.precision={precision}",
                        f"model.inference.constrained={constrained}",
                    ],
                )
                for precision in args.precisions
                for batch in (1, args.batch)
            }
            first = args.precisions[0]
            reference = texts[(first, 1)]
            for (precision, batch), these in texts.items():
                if (precision, batch) == (first, 1):
                    continue
                same_precision = texts[(precision, 1)]
                key = f"constrained_{constrained}_{precision}_batch{batch}"
                figures[f"{key}_differs_from_batch1"] = sum(
                    a != b for a, b in zip(these, same_precision, strict=True)
                )
                figures[f"{key}_differs_from_{first}_batch1"] = sum(
                    a != b for a, b in zip(these, reference, strict=True)
                )
            figures[f"constrained_{constrained}_queries"] = len(reference)
    print(machine())
    for name, value in figures.items():
        print(f"{name}={value}")


if __name__ == "__main__":
    main()
