"""The answer text: formatting targets as atoms (text pieces and digit/sign slots) and parsing it back.

``From <SEG_START> 36 to 68 <OFFSET> +01 and -04 <RETHINK> 37 to 65 <OFFSET> +00 and +00 <SEG_END>.``
Zero refinement steps give ``From <SEG_START> 36 to 68 <SEG_END>.``. Parsing reads the structure
of the text (markers and numbers), never fixed token positions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from timerefine.answer_format.targets import RefineStep
from timerefine.answer_format.timeline import MAX_INDEX
from timerefine.answer_format.tokens import OFFSET, RETHINK, SEG_END, SEG_START

AtomKind = Literal["text", "digit", "sign"]


@dataclass(frozen=True)
class Atom:
    """A piece of the answer: fixed ``text``, or one ``digit``/``sign`` character the model chooses."""

    kind: AtomKind
    text: str


def _number(value: int) -> list[Atom]:
    tens, ones = divmod(value, 10)
    return [Atom("digit", str(tens)), Atom("digit", str(ones))]


def _signed(value: int) -> list[Atom]:
    return [Atom("sign", "+" if value >= 0 else "-"), *_number(abs(value))]


def answer_atoms(steps: list[RefineStep], with_offsets: bool) -> list[Atom]:
    """The answer for ``steps`` as atoms; every answer of a given step count has the same layout."""
    atoms = [Atom("text", "From "), Atom("text", SEG_START), Atom("text", " ")]
    for i, step in enumerate(steps):
        if i > 0:
            atoms += [Atom("text", " "), Atom("text", RETHINK), Atom("text", " ")]
        atoms += [*_number(step.start), Atom("text", " to "), *_number(step.end)]
        if with_offsets:
            atoms += [Atom("text", " "), Atom("text", OFFSET), Atom("text", " ")]
            atoms += [*_signed(step.offset_start), Atom("text", " and "), *_signed(step.offset_end)]
    return [*atoms, Atom("text", " "), Atom("text", SEG_END), Atom("text", ".")]


def answer_layout(refine_steps: int) -> list[Atom]:
    """The atom layout of any answer with ``refine_steps`` refinement steps (slot values are 0)."""
    return answer_atoms([RefineStep(0, 0)] * (refine_steps + 1), with_offsets=refine_steps > 0)


def format_answer(steps: list[RefineStep], with_offsets: bool) -> str:
    return "".join(atom.text for atom in answer_atoms(steps, with_offsets))


_SEGMENT = re.compile(
    r"\s*(\d{1,2})\s*to\s*(\d{1,2})(?:\s*"
    + re.escape(OFFSET)
    + r"\s*([+-])\s*(\d{1,2})\s*and\s*([+-])\s*(\d{1,2}))?\s*"
)


def parse_answer(text: str) -> list[RefineStep]:
    """Every step that parses, in order; an empty list when nothing does.

    Reads after ``<SEG_START>`` (when present) up to ``<SEG_END>``. Without ``<SEG_END>`` the
    generation was cut short and only the steps closed by ``<RETHINK>`` count. Each step must be
    exactly ``s to e`` (optionally ``<OFFSET> +a and -b``); a step without offsets gets zero offsets.
    """
    body = text.split(SEG_START, 1)[-1]
    chunks = body.split(SEG_END, 1)[0].split(RETHINK)
    if SEG_END not in body:
        chunks = chunks[:-1]  # cut short: the last step may end mid-number or before its offsets
    steps = []
    for chunk in chunks:
        match = _SEGMENT.fullmatch(chunk)
        if match is None:
            break
        start, end, sign_s, off_s, sign_e, off_e = match.groups()
        offset_start = int(sign_s + off_s) if off_s is not None else 0
        offset_end = int(sign_e + off_e) if off_e is not None else 0
        steps.append(RefineStep(int(start), int(end), offset_start, offset_end))
    return steps


def spaced(text: str) -> str:
    """Generated text with one space around each marker (tokenizers may fold those spaces away)."""
    for marker in (SEG_START, OFFSET, RETHINK):
        text = re.sub(r"\s*" + re.escape(marker) + r"\s*", f" {marker} ", text)
    return re.sub(r"\s*" + re.escape(SEG_END), f" {SEG_END}", text).strip()


def ordered_clipped(segment: tuple[float, float]) -> tuple[float, float]:
    """A segment with its ends inside ``[0, 99]`` and ``start <= end``."""
    start, end = (min(max(x, 0), MAX_INDEX) for x in segment)
    return (start, end) if start <= end else (end, start)


def step_segments(steps: list[RefineStep], refine_steps: int) -> list[tuple[float, float]]:
    """The predictions along the refinement path: the first coarse segment, then each refined one.

    With ``refine_steps == 0`` (direct answers) this is the single predicted segment; otherwise up
    to ``refine_steps + 2`` segments, fewer when the generation was cut short.
    """
    if not steps:
        return []
    first = ordered_clipped((steps[0].start, steps[0].end))
    if refine_steps == 0:
        return [first]
    return [first, *(ordered_clipped(step.refined) for step in steps[: refine_steps + 1])]
