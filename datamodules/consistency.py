"""What no single annotation line shows, found across a dataset's splits: a video given two
durations, a (video, query) pair that training has seen and evaluation scores again, and an evaluated
video whose frames training has seen with other queries."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from grounding.answer_format.prompts import normalize_query
from grounding.records import GroundingRecord

EXAMPLES = 3
TRAINED = "train"


def _place(record: GroundingRecord, split: str) -> str:
    return record.where or f"{split} query {record.qid}"


def duration_conflicts(splits: Mapping[str, Sequence[GroundingRecord]]) -> list[str]:
    """A line per query that states another duration of its video than the video's first query does:
    each query is timed by its own, so its features and its answer disagree with another's."""
    first: dict[str, tuple[float, str]] = {}
    lines = []
    for split, records in splits.items():
        for record in records:
            here = (record.duration, _place(record, split))
            duration, where = first.setdefault(record.video_id, here)
            if abs(record.duration - duration) > 1e-6 * max(duration, 1.0):
                lines.append(
                    f"video {record.video_id}: duration {record.duration:g} at {here[1]} but {duration:g} at {where}"
                )
    return lines


def seen_in_training(splits: Mapping[str, Sequence[GroundingRecord]]) -> dict[str, list[str]]:
    """Per evaluated split, a line per query whose (video, normalised query) is also a training
    query: its score measures what was memorised, not grounding."""
    trained = {(r.video_id, normalize_query(r.query)): _place(r, TRAINED) for r in splits.get(TRAINED, ())}
    found: dict[str, list[str]] = {}
    for split, records in splits.items():
        if split == TRAINED:
            continue
        for record in records:
            if (twin := trained.get((record.video_id, normalize_query(record.query)))) is not None:
                found.setdefault(split, []).append(
                    f"{_place(record, split)} = {twin} ({record.video_id}, {record.query!r})"
                )
    return found


def videos_seen_in_training(
    splits: Mapping[str, Sequence[GroundingRecord]],
) -> dict[str, tuple[list[str], int]]:
    """Per evaluated split, its videos that training also holds (with other queries, or the same) and
    how many videos it has: the model has seen their frames, so their scores are not of unseen video."""
    trained = {r.video_id for r in splits.get(TRAINED, ())}
    found = {}
    for split, records in splits.items():
        videos = dict.fromkeys(r.video_id for r in records)
        if split != TRAINED and (seen := [v for v in videos if v in trained]):
            found[split] = (seen, len(videos))
    return found


def consistency_warnings(name: str, splits: Mapping[str, Sequence[GroundingRecord]]) -> list[str]:
    """The warnings to log for dataset ``name``, each with its count and first examples."""
    warnings = []
    if conflicts := duration_conflicts(splits):
        warnings.append(
            f"{name}: {len(conflicts)} queries give their video another duration than its first query, "
            f"e.g. {'; '.join(conflicts[:EXAMPLES])}"
        )
    for split, lines in seen_in_training(splits).items():
        warnings.append(
            f"{name} {split}: {len(lines)} of {len(splits[split])} queries are also training queries "
            f"(same video and query), so their scores measure memory, e.g. {'; '.join(lines[:EXAMPLES])}"
        )
    for split, (videos, count) in videos_seen_in_training(splits).items():
        warnings.append(
            f"{name} {split}: {len(videos)} of {count} videos are also training videos, so their frames "
            f"were trained on (scores of seen video), e.g. {', '.join(videos[:EXAMPLES])}"
        )
    return warnings
