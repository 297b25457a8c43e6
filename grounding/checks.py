"""Value rules of the spec dataclasses, each written once, on the field it governs.

``checked(default, rule)`` declares a field with its rule; a :class:`Checked` dataclass applies its
fields' rules, then its ``relations()`` (rules across fields), whenever it is built: by code, or by
the config loader from a config node (which puts the node's path in front of each message). A rule
returns what is wrong with a value, or None.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import field, fields
from pathlib import Path
from typing import Any

Rule = Callable[[Any], "str | None"]


def integer(low: int, high: int | None = None) -> Rule:
    """An int in [low, high]."""
    within = f">= {low}" if high is None else f"in [{low}, {high}]"

    def rule(value: Any) -> str | None:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
        return None if ok and (high is None or value <= high) else f"must be an integer {within}"

    return rule


def number(low: float, high: float = math.inf, open_low: bool = False, open_high: bool = False) -> Rule:
    """A finite number between ``low`` and ``high``; an open end excludes the bound itself."""
    if high == math.inf:
        within = f"> {low}" if open_low else f">= {low}"
    else:
        within = f"in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"

    def rule(value: Any) -> str | None:
        a_number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        above = a_number and (value > low if open_low else value >= low)
        below = above and (value < high if open_high else value <= high)
        return None if below else f"must be a finite number {within}"

    return rule


PROBABILITY, POSITIVE, NON_NEGATIVE = number(0, 1), number(0, open_low=True), number(0)


def optional(rule: Rule) -> Rule:
    """``null`` or a value that passes ``rule``."""
    return lambda value: None if value is None else rule(value)


def items(rule: Rule, min_len: int = 0, max_len: int | None = None) -> Rule:
    """A list of ``min_len`` to ``max_len`` values that each pass ``rule``."""
    size = {0: "a list", 1: "a non-empty list"}.get(min_len, f"a list of at least {min_len} values")
    size = f"a list of {min_len} values" if min_len == max_len else size

    def each(value: Any) -> str | None:
        sized = isinstance(value, (list, tuple)) and len(value) >= min_len
        if not sized or (max_len is not None and len(value) > max_len):
            return f"must be {size}"
        wrong = [reason for reason in map(rule, value) if reason]
        return f"every value {wrong[0]}" if wrong else None

    return each


def one_of(*choices: str) -> Rule:
    """One of ``choices``, which the rule keeps as ``.choices`` (e.g. for a command line's options)."""

    def rule(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"

    rule.choices = choices  # type: ignore[attr-defined]
    return rule


def a_name(value: Any) -> str | None:
    """A non-empty string: a name or a path."""
    return None if isinstance(value, str) and value else "must be a non-empty name or path"


def not_a_file(value: str) -> str | None:
    """A directory that may not exist yet, below no file (not empty: that would be the working directory)."""
    if not value:
        return "must name a directory (empty would write the run into the working directory)"
    path = Path(value)
    existing = next((folder for folder in (path, *path.parents) if folder.exists()), path)
    if not existing.exists() or existing.is_dir():
        return None
    if existing == path:
        return f"{value} exists and is not a directory"
    return f"{existing} is a file, so no directory can be made below it"


def a_writable_folder(value: str) -> str | None:
    """:func:`not_a_file`, in a folder this process may write: checked where something is about to be
    written (a config names folders that other machines or a finished run's reader never write)."""
    if reason := not_a_file(value):
        return reason
    existing = next((folder for folder in (Path(value), *Path(value).parents) if folder.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable here (no write access, or a read-only file system)"
    return None


def show(value: Any) -> str:
    return "null" if value is None else str(value)


def checked(default: Any, rule: Rule) -> Any:
    """A dataclass field with its rule (a list or dict default is copied for each instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"rule": rule})
    return field(default=default, metadata={"rule": rule})


class SpecError(ValueError):
    """What a spec refuses: one line per value, each starting with the field's name."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("; ".join(lines))
        self.lines = lines


class Checked:
    """A spec dataclass that checks its fields' rules, then its ``relations()``, when it is built."""

    def __post_init__(self) -> None:
        values = {f.name: (getattr(self, f.name), f.metadata.get("rule")) for f in fields(self)}  # type: ignore[arg-type]
        lines = [f"{n}={show(v)}: {why}" for n, (v, rule) in values.items() if rule and (why := rule(v))]
        lines = lines or list(self.relations())
        if lines:
            raise SpecError(lines)

    def relations(self) -> Iterator[str]:
        """Rules across fields: a line for each broken one, starting with the field it is about."""
        return iter(())
