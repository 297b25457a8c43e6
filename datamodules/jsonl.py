"""Any dataset as JSONL: one query per line, ``{"qid", "query", "video_id", "duration", "windows"}``.

``windows`` is one ``[start, end]`` or a list of them (seconds). ``keys`` names the fields as a file
spells them, e.g. QVHighlights/Lighthouse files: ``{video_id: vid, windows: relevant_windows}``.
Problems name ``file:line`` (a line that is not UTF-8 is malformed); the quirk policy applies to every
window (datamodules/quirks.py).
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping
from pathlib import Path

from datamodules.quirks import (
    MissingAnnotationFile,
    QuirkPolicy,
    QuirkReport,
    resolve_windows,
    text_lines,
)
from grounding.metrics.windows import MULTI_WINDOW_MODES
from grounding.records import GroundingRecord
from grounding.text_files import UnreadJSON, json_value

FIELDS = ("qid", "query", "video_id", "duration", "windows")
# Lighthouse's JSONL layout (QVHighlights and the datasets it converts), and its SlowFast (2304) + CLIP
# (512) clip features concatenated; Lighthouse's 2818 adds 2 temporal-endpoint dimensions it computes
# at load time, which files here do not hold (the projector places tokens on the timeline itself).
LIGHTHOUSE_KEYS = dict(
    qid="qid", query="query", video_id="vid", duration="duration", windows="relevant_windows"
)
LIGHTHOUSE_DIM = 2304 + 512


def field_keys(keys: Mapping[str, str] | None = None) -> dict[str, str]:
    """Each field's key in the file: itself unless ``keys`` renames it."""
    keys = dict(keys or {})
    unknown = sorted(set(keys) - set(FIELDS))
    if unknown:
        raise ValueError(f"data.source.keys: {unknown} are not JSONL fields; the fields are {list(FIELDS)}")
    return {name: str(keys.get(name, name)) for name in FIELDS}


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_id(value: object) -> bool:
    return (isinstance(value, str) and bool(value.strip())) or (
        isinstance(value, int) and not isinstance(value, bool)
    )


def parse_windows(value: object) -> list[tuple[float, float]] | None:
    """``[start, end]`` or ``[[start, end], ...]`` (at least one) as float pairs; None when malformed."""
    if isinstance(value, list) and len(value) == 2 and all(map(_is_number, value)):
        value = [value]
    if not isinstance(value, list) or not value:
        return None
    pairs = [w for w in value if isinstance(w, list) and len(w) == 2 and all(map(_is_number, w))]
    return [(float(s), float(e)) for s, e in pairs] if len(pairs) == len(value) else None


def _problem(entry: object, keys: dict[str, str]) -> str | None:
    """What makes a parsed line unusable before the quirk policy sees it, or None."""
    if not isinstance(entry, dict):
        return f"expected a JSON object, got {type(entry).__name__}"
    missing = [keys[name] for name in FIELDS if keys[name] not in entry]
    if missing:
        return f"missing key(s) {missing}"
    checks = {
        "qid": (_is_id, "a non-empty string or an integer"),
        "video_id": (_is_id, "a non-empty string or an integer"),
        "query": (lambda v: isinstance(v, str), "a string"),
        "duration": (lambda v: _is_number(v) and math.isfinite(v) and v > 0, "a positive number of seconds"),
        "windows": (lambda v: parse_windows(v) is not None, "[start, end] or a non-empty list of them"),
    }
    for name, (ok, expected) in checks.items():
        if not ok(entry[keys[name]]):
            return f"{keys[name]!r} must be {expected}, got {entry[keys[name]]!r}"
    return None


def parse_jsonl(
    path: str | Path,
    policy: QuirkPolicy | None = None,
    keys: Mapping[str, str] | None = None,
    multi_window: str = "best",
) -> tuple[list[GroundingRecord], QuirkReport]:
    """Parse one JSONL file; a query's qid is the file's, and may appear once."""
    if multi_window not in MULTI_WINDOW_MODES:
        raise ValueError(
            f"data.source.multi_window must be one of {MULTI_WINDOW_MODES}, got {multi_window!r}"
        )
    policy, keys, path = policy or QuirkPolicy(), field_keys(keys), Path(path)
    report = QuirkReport(source=str(path))
    records: list[GroundingRecord] = []
    seen: dict[str, int] = {}
    for lineno, line in text_lines(path, report, policy):
        where = f"{path}:{lineno}"
        try:
            entry = json_value(line.rstrip("\r\n"))  # an error's column in the line, not past its end
        except json.JSONDecodeError as err:
            report.malformed(where, f"not valid JSON: {err.msg} (column {err.colno})", policy)
            continue
        except UnreadJSON as err:
            report.malformed(where, str(err), policy)
            continue
        problem = _problem(entry, keys)
        qid = None if problem else str(entry[keys["qid"]])
        if qid in seen:
            problem = f"qid {qid} repeats line {seen[qid]}"
        if problem:
            report.malformed(where, problem, policy)
            continue
        seen[qid] = lineno
        record = resolve_windows(
            qid,
            str(entry[keys["video_id"]]),
            entry[keys["query"]].strip(),
            float(entry[keys["duration"]]),
            parse_windows(entry[keys["windows"]]),
            where,
            policy,
            report,
            multi_window,
        )
        if record is not None:
            records.append(record)
    return records, report


def load_jsonl(
    root: str | Path,
    split: str,
    policy: QuirkPolicy | None = None,
    annotation_file: str | None = None,
    keys: Mapping[str, str] | None = None,
    multi_window: str = "best",
) -> tuple[list[GroundingRecord], QuirkReport]:
    """Load ``{split}.jsonl`` (or ``annotation_file``) from ``root``; logs the quirk report."""
    path = Path(root) / (annotation_file or f"{split}.jsonl")
    if not path.is_file():
        raise MissingAnnotationFile(path, split)
    records, report = parse_jsonl(path, policy, keys, multi_window)
    report.log()
    return records, report
