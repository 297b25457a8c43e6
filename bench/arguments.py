"""argparse types the benchmark scripts share: a bad value is argparse's one error line, exit 2.

Paths are made absolute against the caller's working directory: the scripts' child ``train.py``
processes run in the repository root.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable
from pathlib import Path

from timerefine.pipeline.schema import a_run_folder


def caller_path(text: str) -> Path:
    """A path, absolute against the caller's working directory."""
    return Path(text).absolute()


def new_folder(text: str) -> Path:
    """A folder to write runs into: absent or empty (a run finished there would not run again)."""
    path = caller_path(text)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise argparse.ArgumentTypeError(f"{text} exists and is not an empty folder; give a new one")
    return path


def run_folder(text: str) -> Path:
    """A trained run's folder (config.yaml and checkpoints/)."""
    if (problem := a_run_folder(text)) is not None:
        raise argparse.ArgumentTypeError(problem)
    return caller_path(text)


def non_negative(text: str) -> float:
    """A finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def key_value(text: str) -> tuple[str, str]:
    """A ``KEY=VALUE`` pair."""
    key, equals, value = text.partition("=")
    if not key or not equals:
        raise argparse.ArgumentTypeError(f"must be KEY=VALUE, got {text!r}")
    return key, value


def names_of(known: Iterable[str]) -> Callable[[str], list[str]]:
    """Comma-separated names, each one of ``known``."""
    choices = list(known)

    def parse(text: str) -> list[str]:
        names = [name for name in text.split(",") if name]
        if unknown := [name for name in names if name not in choices]:
            raise argparse.ArgumentTypeError(f"unknown {unknown[0]!r}; known: {', '.join(choices)}")
        return names

    return parse
