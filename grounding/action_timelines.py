"""The real action timelines of Charades videos: the ``actions`` and ``length`` columns of
``Charades_v1_{train,test}.csv`` (``c092 11.90 21.20;c147 0.00 12.60``: class, start, end seconds).

Every Charades-STA query's moment is exactly one of its video's annotated actions, so a timeline
lists the events a query can name. Reversed intervals are swapped and ends past ``length`` clipped
(both occur in the release); intervals left empty by the clipping are dropped.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from grounding.text_files import seconds, utf8_text

NUM_CLASSES = 157
_ACTION = re.compile(r"c(\d{3}) (\d+(?:\.\d*)?) (\d+(?:\.\d*)?)")


@dataclass(frozen=True)
class Action:
    """One annotated action: class index ``label`` (``c092`` -> 92) over [start, end] seconds."""

    label: int
    start: float
    end: float


@dataclass(frozen=True)
class Timeline:
    """A video's annotated actions; ``split`` names the CSV it came from (train or test)."""

    video_id: str
    split: str
    duration: float
    actions: tuple[Action, ...]


def parse_actions(cell: str, duration: float, where: str) -> tuple[Action, ...]:
    """The ``actions`` cell as Actions inside [0, duration]; raises ValueError naming ``where``."""
    actions = []
    for item in filter(None, (part.strip() for part in cell.split(";"))):
        match = _ACTION.fullmatch(item)
        if match is None or int(match[1]) >= NUM_CLASSES:
            raise ValueError(f"{where}: expected 'cNNN start end' (class < {NUM_CLASSES}), got {item!r}")
        start, end = sorted((float(match[2]), float(match[3])))
        start, end = min(start, duration), min(end, duration)
        if end > start:
            actions.append(Action(int(match[1]), start, end))
    return tuple(actions)


def read_timelines(csv_paths: Iterable[str | Path]) -> dict[str, Timeline]:
    """Video id -> Timeline from Charades CSVs named ``Charades_v1_<split>.csv``; rows whose
    ``length`` is not a positive number are left out (their videos then have no timeline), and so are
    videos given two lengths (the annotation reader refuses them, or leaves their queries out). A line
    that is not UTF-8 or an ``actions`` cell that is no list of actions is a ValueError naming it."""
    timelines: dict[str, Timeline] = {}
    twice: set[str] = set()
    for path in map(Path, csv_paths):
        split = path.stem.rpartition("_")[2]
        reader = csv.DictReader(io.StringIO(utf8_text(path), newline=""))
        if not {"id", "actions", "length"} <= set(reader.fieldnames or ()):
            raise ValueError(f"{path}: expected 'id', 'actions' and 'length' columns")
        for row in reader:
            try:
                duration = seconds(row["length"])
            except ValueError:
                continue
            if not (math.isfinite(duration) and duration > 0):
                continue
            if row["id"] in timelines and timelines[row["id"]].duration != duration:
                twice.add(row["id"])
                continue
            actions = parse_actions(row["actions"] or "", duration, f"{path}:{reader.line_num}")
            timelines[row["id"]] = Timeline(row["id"], split, duration, actions)
    return {video: timeline for video, timeline in timelines.items() if video not in twice}
