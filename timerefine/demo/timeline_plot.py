"""The demo's timeline: one bar per segment (truth, each refinement step, aux head, final) as SVG.

Pure: segments in, markup out. Each bar carries ``data-row`` / ``data-start`` / ``data-end`` (seconds)
so a browser test can read what was drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

from timerefine.inference.grounder import Grounding

WIDTH, LABEL_WIDTH, ROW_HEIGHT, AXIS_HEIGHT = 760, 150, 26, 30
COLOURS = {"truth": "#2e7d32", "step": "#90a4ae", "aux": "#8e24aa", "final": "#1565c0"}


@dataclass(frozen=True)
class Row:
    """One bar: ``kind`` is truth | step | aux | final; ``name`` is its ``data-row`` id."""

    name: str
    label: str
    start: float
    end: float
    kind: str


def rows_of(answer: Grounding, truth: tuple[float, float] | None) -> list[Row]:
    """The truth (when known), every refinement step (coarse first), the aux head's guess, the answer."""
    rows = [] if truth is None else [Row("truth", "ground truth", *truth, "truth")]
    last = len(answer.steps) - 1
    for index, (start, end) in enumerate(answer.steps):
        label = "coarse (step 0)" if index == 0 else f"refined, step {index}"
        rows.append(Row(f"step{index}", label if index < last else f"{label} (last)", start, end, "step"))
    if answer.aux is not None:
        rows.append(Row("aux", "aux head", *answer.aux, "aux"))
    if answer.start is not None and answer.end is not None:
        rows.append(Row("final", "answer", answer.start, answer.end, "final"))
    return rows


def _ticks(duration: float) -> list[float]:
    """About six round tick times across ``[0, duration]``."""
    steps = (0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800)
    step = next((s for s in steps if duration / s <= 8), math.ceil(duration / 8 / 3600) * 3600)  # or hours
    return [i * step for i in range(int(duration / step) + 1)]


def timeline_svg(rows: list[Row], duration: float) -> str:
    """An SVG of ``rows`` over a ``duration``-second axis."""
    track = WIDTH - LABEL_WIDTH - 10

    def x(seconds: float) -> float:
        return LABEL_WIDTH + track * min(max(seconds, 0.0), duration) / duration

    height = ROW_HEIGHT * len(rows) + AXIS_HEIGHT
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="timeline" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">'
    ]
    for index, row in enumerate(rows):
        top = index * ROW_HEIGHT
        left, right = x(row.start), x(row.end)
        parts += [
            f'<rect x="{LABEL_WIDTH}" y="{top + 4}" width="{track}" height="{ROW_HEIGHT - 8}" fill="#eceff1"/>',
            f'<text x="{LABEL_WIDTH - 8}" y="{top + ROW_HEIGHT / 2 + 4}" text-anchor="end">{escape(row.label)}</text>',
            f'<g class="segment" data-row="{row.name}" data-start="{row.start:.3f}" data-end="{row.end:.3f}">'
            f'<rect x="{left:.1f}" y="{top + 4}" width="{max(right - left, 2):.1f}" height="{ROW_HEIGHT - 8}" '
            f'rx="3" fill="{COLOURS[row.kind]}"/>'
            f"<title>{escape(row.label)}: {row.start:.2f}-{row.end:.2f} s</title></g>",
        ]
    axis = ROW_HEIGHT * len(rows)
    parts.append(
        f'<line x1="{LABEL_WIDTH}" y1="{axis + 4}" x2="{LABEL_WIDTH + track}" y2="{axis + 4}" stroke="#546e7a"/>'
    )
    for tick in _ticks(duration):
        parts += [
            f'<line x1="{x(tick):.1f}" y1="{axis + 4}" x2="{x(tick):.1f}" y2="{axis + 9}" stroke="#546e7a"/>',
            f'<text x="{x(tick):.1f}" y="{axis + 22}" text-anchor="middle">{tick:g} s</text>',
        ]
    return "".join([*parts, "</svg>"])
