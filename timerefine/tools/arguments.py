"""argparse types the command-line tools share: a bad value is argparse's one error line, exit 2."""

from __future__ import annotations

import argparse


def at_least_one(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value
