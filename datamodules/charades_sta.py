"""Charades-STA annotations: ``VIDEOID start end##sentence`` lines, durations from the Charades CSVs."""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from datamodules.quirks import (
    MissingAnnotationFile,
    QuirkError,
    QuirkPolicy,
    QuirkReport,
    UnknownSplit,
    resolve_segment,
    text_lines,
)
from grounding.records import GroundingRecord
from grounding.text_files import seconds

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
CSV_NAMES = ("Charades_v1_train.csv", "Charades_v1_test.csv")


def read_durations(csv_paths: Iterable[str | Path], strict: bool = True) -> dict[str, float]:
    """Map video id to the CSV ``length`` in seconds. A line that is not UTF-8, a row whose length is
    not a number of seconds > 0, or a video given another length on an earlier row, is a QuirkError
    naming ``file:line`` (``strict``), else left out with a warning naming it: its video has no duration."""
    durations: dict[str, float] = {}
    rows_of: dict[str, str] = {}  # video id -> the file:line that gave its length
    for path in map(Path, csv_paths):
        report = QuirkReport(source=str(path))
        lines = list(text_lines(path, report, QuirkPolicy(strict=strict)))
        reader = csv.DictReader(line for _, line in lines)
        if not {"id", "length"} <= set(reader.fieldnames or ()):
            raise QuirkError(f"{path}: expected 'id' and 'length' columns, got {reader.fieldnames}")
        for row in reader:
            where, video_id = f"{path}:{lines[reader.line_num - 1][0]}", row["id"]
            try:
                length = seconds(row["length"])
            except ValueError:
                length = math.nan
            given = f"{where}: video {video_id}: length {row['length']!r}"
            if not (math.isfinite(length) and length > 0):
                problem = f"{given} is not a duration in seconds > 0"
            elif video_id in rows_of and durations.get(video_id) != length:
                problem = f"{given}, another than on {rows_of[video_id]}"
                durations.pop(video_id, None)
            else:  # its first row, or another that agrees
                durations[video_id] = length
                rows_of.setdefault(video_id, where)
                continue
            if strict:
                raise QuirkError(problem)
            log.warning("%s; its queries have no duration (counted as unknown_video)", problem)
        for skipped in report.summary_lines()[1:]:
            log.warning("%s; their videos' queries have no duration (counted as unknown_video)", skipped)
    return durations


def parse_charades_sta(
    path: str | Path,
    durations: Mapping[str, float],
    split: str,
    policy: QuirkPolicy | None = None,
    absent_csvs: Sequence[Path] = (),
) -> tuple[list[GroundingRecord], QuirkReport]:
    """Parse one annotation file; qids are ``charades:{split}:{line:06d}`` (1-based line numbers). The
    error for a video without a duration names the duration CSVs that are ``absent_csvs``."""
    policy = policy or QuirkPolicy()
    path = Path(path)
    report = QuirkReport(source=str(path))
    records: list[GroundingRecord] = []
    for lineno, line in text_lines(path, report, policy):
        where = f"{path}:{lineno}"
        head, sep, sentence = line.rstrip("\r\n").partition("##")
        fields = head.split()
        if not sep or len(fields) != 3:
            report.malformed(where, f"expected 'VIDEOID start end##sentence', got {line.strip()!r}", policy)
            continue
        video_id, start_text, end_text = fields
        try:
            start, end = seconds(start_text), seconds(end_text)
        except ValueError:
            report.malformed(where, f"times are not numbers: {start_text!r} {end_text!r}", policy)
            continue
        qid = f"charades:{split}:{lineno:06d}"
        duration = durations.get(video_id)
        if duration is None and absent_csvs and policy.unknown_video == "error":
            missing = " and ".join(map(str, absent_csvs))
            raise QuirkError(
                f"{where}: unknown video: {video_id} has no usable duration in the CSVs read (no such file {missing})"
            )
        record = resolve_segment(qid, video_id, sentence.strip(), duration, start, end, where, policy, report)
        if record is not None:
            records.append(record)
    return records, report


def load_charades_sta(
    root: str | Path,
    split: str,
    policy: QuirkPolicy | None = None,
    annotation_file: str | None = None,
) -> tuple[list[GroundingRecord], QuirkReport]:
    """Load ``charades_sta_{split}.txt`` (or ``annotation_file``) from ``root``; logs the quirk report."""
    if split not in SPLITS:
        raise UnknownSplit("Charades-STA", split, SPLITS)
    root = Path(root)
    csv_paths = [root / name for name in CSV_NAMES if (root / name).is_file()]
    if not csv_paths:
        raise FileNotFoundError(f"no Charades duration CSV ({' or '.join(CSV_NAMES)}) in {root}")
    path = root / (annotation_file or f"charades_sta_{split}.txt")
    if not path.is_file():
        raise MissingAnnotationFile(path, split)
    policy = policy or QuirkPolicy()
    absent = [root / name for name in CSV_NAMES if root / name not in csv_paths]
    records, report = parse_charades_sta(
        path,
        read_durations(csv_paths, policy.strict),
        split,
        policy,
        absent,
    )
    report.log()
    return records, report
