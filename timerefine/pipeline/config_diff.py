"""Which keys differ between two resolved configs: what resume and evaluate compare a run with."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

ABSENT = "(absent)"


def flat(node: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value of every leaf (a list or an empty mapping is a leaf)."""
    leaves: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, Mapping) and value:
            leaves |= flat(value, f"{prefix}{key}.")
        else:
            leaves[f"{prefix}{key}"] = value
    return leaves


def changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (old, new) of every leaf that differs, sorted by key; :data:`ABSENT` where one has
    no such key."""
    before, after = flat(old), flat(new)
    pairs = {key: (before.get(key, ABSENT), after.get(key, ABSENT)) for key in before.keys() | after.keys()}
    return {key: pair for key, pair in sorted(pairs.items()) if not same(*pair)}


def same(old: Any, new: Any) -> bool:
    """Equal and of one type, item by item in lists: Lightning reads ``1`` (one batch) and ``1.0``
    (all of them) apart, and ``true`` and ``1``."""
    if isinstance(old, list) and isinstance(new, list):
        return len(old) == len(new) and all(same(a, b) for a, b in zip(old, new, strict=True))
    return type(old) is type(new) and old == new


def show(value: Any) -> str:
    """A config value as a user writes it (``null``, ``true``; anything else as str)."""
    return json.dumps(value) if value is None or isinstance(value, bool) else str(value)
