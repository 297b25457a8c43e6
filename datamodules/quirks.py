"""Policy and report for known annotation quirks, shared by the dataset parsers.

Every record that a parser drops or changes is counted here by quirk kind, so nothing
disappears silently; the report is returned alongside the records and logged once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from grounding.answer_format.prompts import normalize_query, query_error
from grounding.checks import Checked, checked, one_of
from grounding.metrics.windows import target_window
from grounding.records import GroundingRecord
from grounding.text_files import decoded_line

log = logging.getLogger(__name__)

START_AFTER_END = "start_after_end"
END_AFTER_DURATION = "end_after_duration"
START_AFTER_DURATION = "start_after_duration"
ZERO_LENGTH = "zero_length"
UNKNOWN_VIDEO = "unknown_video"
EMPTY_QUERY = "empty_query"
MALFORMED = "malformed"

DROPPED, SKIPPED = "dropped", "skipped"

# Ends within this many seconds past the duration are float noise (ActivityNet stores durations
# such as 70.28999999999999 for segments ending at 70.29); they are snapped to the duration
# without counting as a quirk.
TIME_TOLERANCE = 1e-6


class QuirkError(ValueError):
    """An annotation problem that the policy says must stop parsing; the message names file and line."""


class MissingAnnotationFile(FileNotFoundError):
    """A split's annotation file that is not there; the message names it, the split and, when a
    source read it for a run, the config key that chose it."""

    def __init__(self, path: Path, split: str, key: str = "") -> None:
        super().__init__(f"{path}: no such annotation file (the {split} split{f': {key}' if key else ''})")
        self.path = path


class UnknownSplit(QuirkError):
    """A split name the dataset does not have."""

    def __init__(self, dataset: str, split: str, names: tuple[str, ...]) -> None:
        super().__init__(f"{dataset} has no split {split!r} (its splits: {', '.join(names)})")


@dataclass(frozen=True)
class QuirkPolicy(Checked):
    """What to do with each known quirk; ``strict`` makes malformed lines an error instead of a skip.
    ``zero_length``: a window with start == end (after swapping and clipping), a moment no prediction
    can overlap (ActivityNet Captions train holds 2)."""

    start_after_end: str = checked("swap", one_of("swap", "drop"))
    end_after_duration: str = checked("clip", one_of("clip", "drop"))
    unknown_video: str = checked("error", one_of("drop", "error"))
    empty_query: str = checked("drop", one_of("drop", "error"))
    zero_length: str = checked("drop", one_of("drop", "error"))
    strict: bool = True


@dataclass
class QuirkReport:
    """Counts of queries read/kept and of each quirk met, with the first few examples (``file:line``)."""

    source: str
    kept: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    actions: dict[str, str] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 3

    @property
    def read(self) -> int:
        """Queries met in the source: kept + dropped, so no query can vanish uncounted."""
        return self.kept + self.dropped

    @property
    def dropped(self) -> int:
        """Queries read but not kept (dropped by policy or skipped as malformed)."""
        return sum(self.dropped_by_kind().values())

    def dropped_by_kind(self) -> dict[str, int]:
        """Queries read but not kept, per quirk kind."""
        return {kind: n for kind, n in self.counts.items() if self.actions[kind] in (DROPPED, SKIPPED)}

    def note(self, kind: str, action: str, where: str, detail: str, queries: int = 1) -> None:
        """Count ``queries`` occurrences of ``kind`` handled by ``action`` at ``where``."""
        self.counts[kind] = self.counts.get(kind, 0) + queries
        self.actions[kind] = action
        examples = self.examples.setdefault(kind, [])
        if len(examples) < self.max_examples:
            examples.append(f"{where} ({detail})")

    def malformed(self, where: str, detail: str, policy: QuirkPolicy, queries: int = 1) -> None:
        """Raise for a malformed entry under a strict policy, else count its ``queries`` as skipped."""
        if policy.strict:
            raise QuirkError(f"{where}: malformed annotation: {detail}")
        self.note(MALFORMED, SKIPPED, where, detail, queries)

    def summary_lines(self) -> list[str]:
        """One line for the totals, then one line per quirk kind with its first examples."""
        lines = [f"{self.source}: kept {self.kept} of {self.read} queries ({self.dropped} dropped)"]
        for kind in sorted(self.counts):
            examples = "; ".join(self.examples[kind])
            lines.append(f"{self.source}: {kind}: {self.counts[kind]} {self.actions[kind]}, e.g. {examples}")
        return lines

    def log(self, logger: logging.Logger = log) -> None:
        """Log the summary: totals at INFO, each quirk kind at WARNING."""
        total, *quirks = self.summary_lines()
        logger.info(total)
        for line in quirks:
            logger.warning(line)


def text_lines(path: Path, report: QuirkReport, policy: QuirkPolicy) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` for each non-blank line of a UTF-8 file (a byte order mark before the first
    left out); a line that is not UTF-8 is malformed (an error naming ``file:line`` and the byte, or a
    counted skip)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = decoded_line(raw, lineno)
            except ValueError as err:
                report.malformed(f"{path}:{lineno}", str(err), policy)
                continue
            if line.strip():
                yield lineno, line


def resolve_segment(
    qid: str,
    video_id: str,
    query: str,
    duration: float | None,
    start: float,
    end: float,
    where: str,
    policy: QuirkPolicy,
    report: QuirkReport,
) -> GroundingRecord | None:
    """Apply ``policy`` to one parsed query; return its record, or None when the policy drops it."""
    return resolve_windows(qid, video_id, query, duration, [(start, end)], where, policy, report)


def resolve_windows(
    qid: str,
    video_id: str,
    query: str,
    duration: float | None,
    windows: Sequence[tuple[float, float]],
    where: str,
    policy: QuirkPolicy,
    report: QuirkReport,
    multi_window: str = "best",
) -> GroundingRecord | None:
    """Apply ``policy`` to one query and each of its windows; return its record (targets on the
    :func:`target_window` under ``multi_window``), or None when the policy drops it. A window the
    policy drops drops its query (scored without it, a prediction of that moment would count as
    wrong); swaps and clips are counted per window."""
    for start, end in windows:
        if not (math.isfinite(start) and math.isfinite(end) and start >= 0 and end >= 0):
            return report.malformed(where, f"video {video_id}: bad times {start}, {end}", policy)

    def reject(kind: str, action: str, detail: str) -> None:
        if action == "error":
            raise QuirkError(f"{where}: {kind.replace('_', ' ')}: {detail}")
        report.note(kind, DROPPED, where, detail)

    if not normalize_query(query):
        return reject(EMPTY_QUERY, policy.empty_query, f"video {video_id}: empty sentence {query!r}")
    if error := query_error(query):
        return report.malformed(where, f"video {video_id}: {error}", policy)
    if duration is None or not (math.isfinite(duration) and duration > 0):
        return reject(UNKNOWN_VIDEO, policy.unknown_video, f"video {video_id} has no usable duration")
    resolved = []
    for start, end in windows:
        if start > end:
            if policy.start_after_end == "drop":
                return reject(START_AFTER_END, "drop", f"{video_id} {start} > {end}")
            report.note(START_AFTER_END, "swapped", where, f"{video_id} {start} > {end}")
            start, end = end, start
        if start >= duration:
            return reject(START_AFTER_DURATION, "drop", f"{video_id} start {start} >= duration {duration}")
        if end > duration + TIME_TOLERANCE:
            detail = f"{video_id} end {end} > duration {duration}"
            if policy.end_after_duration == "drop":
                return reject(END_AFTER_DURATION, "drop", detail)
            report.note(END_AFTER_DURATION, "clipped", where, detail)
        end = min(end, duration)
        if end <= start:
            return reject(ZERO_LENGTH, policy.zero_length, f"{video_id} [{start}, {end}]")
        resolved.append((start, end))
    report.kept += 1
    start, end = target_window(resolved, multi_window)
    return GroundingRecord(qid, video_id, query, duration, start, end, tuple(resolved), multi_window, where)
