"""What the diagnosis tools share: a run's test predictions read for one dataset, and their report."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from grounding.answer_format.timeline import DEFAULT_TIMELINE, Timeline, timeline_named
from grounding.text_files import json_object_lines
from timerefine.pipeline.arguments import OneLineParser
from timerefine.pipeline.config import ConfigError, saved_config


class RunError(Exception):
    """A run folder a diagnosis cannot read; the message names the file."""


def read_run(
    argv: list[str] | None, description: str, dataset: str, data_root: bool = False
) -> tuple[Path, DictConfig, list[dict]]:
    """Parse ``run_dir [--predictions FILE]`` (and ``--root FOLDER`` with ``data_root``, in place of
    the run's ``data.source.root``); the predictions file, the run's config and its rows.
    Raises :class:`RunError` for a missing file or a run of another dataset."""
    parser = OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--predictions", type=Path, help="default: <run>/predictions/test.jsonl")
    if data_root:
        parser.add_argument(
            "--root", type=Path, help="the dataset's folder (default: the run's data.source.root)"
        )
    args = parser.parse_args(argv)
    path = args.predictions or args.run_dir / "predictions" / "test.jsonl"
    for needed in (args.run_dir / "config.yaml", path):
        if not needed.is_file():
            raise RunError(f"{needed} not found")
    try:
        cfg = saved_config(args.run_dir / "config.yaml")
    except ConfigError as error:
        raise RunError(str(error)) from error
    rows = prediction_rows(path)
    if cfg.data.name != dataset:
        raise RunError(f"{args.run_dir} was trained on data={cfg.data.name}; this tool reads {dataset} runs")
    if not rows:
        raise RunError(f"{path}: no prediction rows")
    if data_root and args.root is not None:
        cfg.data.source.root = str(args.root)
    return path, cfg, rows


def prediction_rows(path: Path) -> list[dict]:
    """The JSON object of each line of a predictions file; RunError naming the line that is none."""
    try:
        return [row for _, row in json_object_lines(path)]
    except ValueError as error:
        raise RunError(str(error)) from error


@dataclass(frozen=True)
class AnswerLayout:
    """How a run's answers read: ``depth`` segments each (coarse, then each refined one; None: not
    recorded), their frame indices on ``timeline``."""

    depth: int | None
    timeline: Timeline

    def frames(self, seconds: float, duration: float) -> float:
        """A time (or length) in frame indices of this timeline."""
        return seconds * self.timeline.span / duration


def answer_layout(cfg: DictConfig) -> AnswerLayout:
    """The layout of a run's saved config (``model.refine.steps``, ``data.timeline``)."""
    steps = OmegaConf.select(cfg, "model.refine.steps", default=None)
    depth = None if steps is None else steps + 2 if steps > 0 else 1
    return AnswerLayout(
        depth, timeline_named(OmegaConf.select(cfg, "data.timeline", default=DEFAULT_TIMELINE.name))
    )


def print_report(
    path: Path, rows: list[dict], table: dict[str, tuple[int, float]], trace: tuple[list[float], float] | None
) -> None:
    """The share and mIoU of each outcome, then the refinement trace when the answers have steps."""
    width = max(len(outcome) for outcome in table) + 2
    print(f"{path}: {len(rows)} queries")
    print(f"{'landed on':<{width}}{'share %':>9}{'mIoU':>8}")
    for outcome, (count, miou) in table.items():
        print(f"{outcome:<{width}}{100 * count / max(len(rows), 1):>9.1f}{miou:>8.1f}")
    if trace:
        errors, moved = trace
        print(
            "mean boundary error per step (frame indices, coarse -> final): "
            + " -> ".join(f"{e:.2f}" for e in errors)
        )
        print(f"final answer differs from the first refined one: {moved:.1f} %")


def fail(error: RunError) -> int:
    print(f"error: {error}", file=sys.stderr)
    return 2
