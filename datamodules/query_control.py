"""Leak checks on the queries: blank every query, or give each evaluation query another video's sentence.

``empty``: every split's queries are empty, so a model sees the video alone; it should not beat the
best query-free choice (grounding/metrics/action_prior.py on Charades-STA). ``shuffled``: the val and
test queries are moved among the split's other videos (training is untouched), each video keeping
its ground truth; a model that reads the query should drop to what it can do without it. Features
are made before this applies (the synthetic ones from the annotated sentences), so a store whose
features carry the query shows through both.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np

from datamodules.synthetic_features import stable_seed
from grounding.records import GroundingRecord

QUERY_CONTROLS = ("annotated", "empty", "shuffled")


class QueryControlError(ValueError):
    """A split that ``data.source.queries`` cannot be applied to; the message names the key and split."""


def shuffled_queries(records: list[GroundingRecord], seed: int) -> list[GroundingRecord]:
    """``records`` with every query taken from a record of another video (a seeded permutation of the
    split's queries); raises ValueError when one video holds more than half of them."""
    per_video = Counter(r.video_id for r in records)
    draw = np.random.default_rng(stable_seed("shuffled_queries", seed)).permutation(len(per_video))
    rank = dict(zip(per_video, draw, strict=True))
    order = sorted(range(len(records)), key=lambda i: (rank[records[i].video_id], i))
    # Queries grouped by video; moving every query ``most`` places on (cyclically) leaves its video's
    # group, as long as no group is longer than the others together.
    most = max(per_video.values())
    if 2 * most > len(records):
        raise ValueError(f"cannot be shuffled among videos: one video holds {most} of {len(records)} queries")
    shuffled = list(records)
    for position, index in enumerate(order):
        donor = records[order[(position + most) % len(order)]]
        shuffled[index] = dataclasses.replace(records[index], query=donor.query)
    return shuffled


def apply_query_control(
    records: list[GroundingRecord], control: str, split: str, seed: int
) -> list[GroundingRecord]:
    """The ``split``'s records under ``control`` (one of :data:`QUERY_CONTROLS`)."""
    if control not in QUERY_CONTROLS:
        raise ValueError(f"queries must be one of {QUERY_CONTROLS}, got {control!r}")
    if control == "empty":
        return [dataclasses.replace(r, query="") for r in records]
    if control == "shuffled" and split != "train":
        try:
            return shuffled_queries(records, seed)
        except ValueError as error:
            raise QueryControlError(f"data.source.queries=shuffled: the {split} split {error}") from error
    return records
