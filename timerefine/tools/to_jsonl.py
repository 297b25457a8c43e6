"""Write Charades-STA or ActivityNet Captions annotations as JSONL files (data=jsonl), one per split.

The annotations go through the dataset's own parser and quirk policy first, so the JSONL holds the
queries a run on that dataset would use, with the same qids:

    timerefine-to-jsonl charades_sta data/charades_sta data/charades_jsonl --start-after-end drop
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from datamodules import activitynet, charades_sta
from datamodules.quirks import QuirkError, QuirkPolicy, QuirkReport
from grounding.checks import a_writable_folder
from grounding.records import GroundingRecord
from timerefine.pipeline.arguments import OneLineParser
from timerefine.pipeline.whole_files import write_whole

Loader = Callable[..., tuple[list[GroundingRecord], QuirkReport]]
DATASETS: dict[str, tuple[Loader, tuple[str, ...], str]] = {
    "charades_sta": (charades_sta.load_charades_sta, charades_sta.SPLITS, "charades_sta_{}.txt"),
    "activitynet": (activitynet.load_activitynet, activitynet.SPLITS, "{}.json"),
}


def jsonl_line(record: GroundingRecord) -> str:
    """One query as a line of the JSONL format (datamodules/jsonl.py)."""
    entry = {
        "qid": record.qid,
        "query": record.query,
        "video_id": record.video_id,
        "duration": record.duration,
        "windows": [list(window) for window in record.windows],
    }
    return json.dumps(entry, ensure_ascii=False)


def present_splits(dataset: str, root: Path) -> list[str]:
    """The dataset's splits whose annotation file is in ``root``."""
    _, splits, pattern = DATASETS[dataset]
    return [split for split in splits if (root / pattern.format(split)).is_file()]


def convert(
    dataset: str, root: str | Path, out: str | Path, splits: list[str], policy: QuirkPolicy
) -> dict[str, tuple[Path, QuirkReport]]:
    """Parse every split first, then write ``out/{split}.jsonl``; returns each split's file and report.
    A file there already is refused (it may hold queries converted under another quirk policy)."""
    out = Path(out)
    if reason := a_writable_folder(str(out)):
        raise FileExistsError(reason)
    paths = {split: out / f"{split}.jsonl" for split in splits}
    if taken := [str(path) for path in paths.values() if path.exists()]:
        raise FileExistsError(f"{', '.join(taken)}: already written; convert into a new folder")
    load = DATASETS[dataset][0]
    parsed = {split: load(root, split, policy) for split in splits}
    out.mkdir(parents=True, exist_ok=True)
    for split, (records, _) in parsed.items():
        write_whole(paths[split], "".join(jsonl_line(record) + "\n" for record in records))
    return {split: (paths[split], report) for split, (_, report) in parsed.items()}


def add_policy_options(parser: argparse.ArgumentParser) -> None:
    """One option per QuirkPolicy field, its choices (its rule's) and default from the dataclass."""
    for spec in dataclasses.fields(QuirkPolicy):
        flag = f"--{spec.name.replace('_', '-')}"
        if "rule" in spec.metadata:
            parser.add_argument(flag, choices=spec.metadata["rule"].choices, default=spec.default)
        else:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=spec.default)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=sorted(DATASETS))
    parser.add_argument("root", type=Path, help="folder of the dataset's annotation files")
    parser.add_argument("out", type=Path, help="folder for {split}.jsonl")
    parser.add_argument("--splits", nargs="+", help="default: every split whose file is in root")
    add_policy_options(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    policy = QuirkPolicy(**{spec.name: getattr(args, spec.name) for spec in dataclasses.fields(QuirkPolicy)})
    splits, known = args.splits or present_splits(args.dataset, args.root), DATASETS[args.dataset][1]
    unknown = sorted(set(splits) - set(known))
    if unknown or not splits:
        wrong = f"--splits {unknown}: {args.dataset} has {list(known)}" if unknown else "no annotation file"
        print(f"error: {args.dataset} in {args.root}: {wrong}", file=sys.stderr)
        return 2
    try:
        written = convert(args.dataset, args.root, args.out, splits, policy)
    except (QuirkError, FileNotFoundError, FileExistsError, PermissionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path, report in written.values():
        print(f"{path}: {report.kept} queries ({report.dropped} of {report.read} dropped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
