"""ActivityNet Captions annotations: ``{vid: {duration, timestamps, sentences}}`` JSON files."""

from __future__ import annotations

import json
import numbers
from pathlib import Path

from datamodules.quirks import (
    MissingAnnotationFile,
    QuirkError,
    QuirkPolicy,
    QuirkReport,
    UnknownSplit,
    resolve_segment,
)
from grounding.records import GroundingRecord
from grounding.text_files import UnreadJSON, json_value, utf8_text

SPLITS = ("train", "val_1", "val_2")


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _segment(value: object) -> tuple[float, float] | None:
    if isinstance(value, list | tuple) and len(value) == 2 and all(map(_is_number, value)):
        return float(value[0]), float(value[1])
    return None


def parse_activitynet(
    path: str | Path, split: str, policy: QuirkPolicy | None = None
) -> tuple[list[GroundingRecord], QuirkReport]:
    """Parse one captions file into one record per sentence; qids are ``anet:{split}:{vid}:{i}``."""
    policy = policy or QuirkPolicy()
    path = Path(path)
    try:
        data = json_value(utf8_text(path))
    except json.JSONDecodeError as err:
        raise QuirkError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from err
    except UnreadJSON as err:
        raise QuirkError(f"{path}: {err}") from err
    except ValueError as err:  # not UTF-8, named file:line
        raise QuirkError(str(err)) from err
    if not isinstance(data, dict):
        raise QuirkError(f"{path}: expected a JSON object of videos, got {type(data).__name__}")
    report = QuirkReport(source=str(path))
    records: list[GroundingRecord] = []
    for video_id, entry in data.items():
        where = f"{path}:{video_id}"
        timestamps = entry.get("timestamps") if isinstance(entry, dict) else None
        sentences = entry.get("sentences") if isinstance(entry, dict) else None
        lists = [len(x) for x in (timestamps, sentences) if isinstance(x, list)]
        if len(lists) != 2 or lists[0] != lists[1]:
            queries = max(lists, default=1) or 1  # every query the entry may have held is skipped
            detail = f"needs 'timestamps' and 'sentences' lists of equal length, got lengths {lists}"
            report.malformed(where, detail, policy, queries)
            continue
        if (given := entry.get("duration")) is not None and not _is_number(given):  # "30.0", true
            detail = f"'duration' must be a number of seconds, got {given!r}"
            report.malformed(where, detail, policy, len(timestamps) or 1)
            continue
        duration = None if given is None else float(given)
        for i, (stamp, sentence) in enumerate(zip(timestamps, sentences, strict=True)):
            segment = _segment(stamp)
            if segment is None or not isinstance(sentence, str):
                report.malformed(f"{where}[{i}]", f"bad segment {stamp!r} or sentence {sentence!r}", policy)
                continue
            record = resolve_segment(
                f"anet:{split}:{video_id}:{i}",
                video_id,
                sentence.strip(),
                duration,
                *segment,
                f"{where}[{i}]",
                policy,
                report,
            )
            if record is not None:
                records.append(record)
    return records, report


def load_activitynet(
    root: str | Path, split: str, policy: QuirkPolicy | None = None, annotation_file: str | None = None
) -> tuple[list[GroundingRecord], QuirkReport]:
    """Load ``{split}.json`` (train, val_1 or val_2; or ``annotation_file``) from ``root``; logs the
    quirk report."""
    if split not in SPLITS:
        raise UnknownSplit("ActivityNet Captions", split, SPLITS)
    path = Path(root) / (annotation_file or f"{split}.json")
    if not path.is_file():
        raise MissingAnnotationFile(path, split)
    records, report = parse_activitynet(path, split, policy)
    report.log()
    return records, report
