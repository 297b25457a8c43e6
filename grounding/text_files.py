"""Reading the text files annotations, requests and predictions come in: UTF-8 (a byte order mark before
the first line left out), JSON objects that name each key once, numbers of seconds as written."""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def decoded_line(raw: bytes, number: int) -> str:
    """Line ``number`` (from 1) of a file as text; ValueError saying which byte is not UTF-8."""
    raw = raw.removeprefix(codecs.BOM_UTF8) if number == 1 else raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8 (byte {raw[err.start]:#04x} at column {err.start + 1})") from err


def utf8_text(path: Path) -> str:
    """The text of a UTF-8 file without a byte order mark; ValueError naming the line of a byte that is
    not UTF-8."""
    raw = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 (byte {raw[err.start]:#04x})") from err


class UnreadJSON(ValueError):
    """JSON that parses but cannot be read as written: an object naming one key twice (``json`` would
    keep the last value, the first unread), or nesting deeper than Python's parser goes."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``'s ``object_pairs_hook``: the object, or :class:`UnreadJSON` naming a repeated key."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise UnreadJSON(f"key {key!r} appears twice in one object (JSON would keep only the last)")
        seen.add(key)
    return dict(pairs)


def json_value(text: str) -> Any:
    """The JSON value of ``text``; json.JSONDecodeError when it is not JSON, :class:`UnreadJSON` when
    it cannot be read as written."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except RecursionError as err:
        raise UnreadJSON("nested too deeply to read (JSON of lists or objects within each other)") from err


def json_object_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Each line of a JSON-lines file that is not blank, with its number (from 1), as the JSON object it
    holds; ValueError naming ``path:line`` of one that is not JSON, cannot be read as written, or is no
    object (or of a byte that is not UTF-8)."""
    for number, line in enumerate(utf8_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json_value(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from error
        except UnreadJSON as error:
            raise ValueError(f"{path}:{number}: {error}") from error
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: not a JSON object")
        yield number, row


def seconds(text: str | None) -> float:
    """A number of seconds as a text file writes it; ValueError for anything else (``float`` would also
    read ``6_9`` as 69)."""
    if text is None or "_" in text:
        raise ValueError(f"not a number: {text!r}")
    return float(text)
