"""The answer text: formatting targets as atoms (text pieces and digit/sign slots) and parsing it back.

``From <SEG_START> 36 to 68 <OFFSET> +01 and -04 <RETHINK> 37 to 65 <OFFSET> +00 and +00 <SEG_END>.``
holds two rounds (K = 1); zero refinement steps give ``From <SEG_START> 36 to 68 <SEG_END>.``.
Parsing reads the structure of the text (markers and numbers), never fixed token positions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from grounding.answer_format.targets import RefineRound, RefineSchedule
from grounding.answer_format.timeline import MAX_INDEX
from grounding.answer_format.tokens import OFFSET, RETHINK, SEG_END, SEG_START

AtomKind = Literal["text", "digit", "sign"]


@dataclass(frozen=True)
class Atom:
    """A piece of the answer: fixed ``text``, or one ``digit``/``sign`` character the model chooses."""

    kind: AtomKind
    text: str


def _number(value: int) -> list[Atom]:
    tens, ones = divmod(value, 10)
    return [Atom("digit", str(tens)), Atom("digit", str(ones))]


def _signed(value: int, zero_sign: str) -> list[Atom]:
    sign = "+" if value > 0 else "-" if value < 0 else zero_sign
    return [Atom("sign", sign), *_number(abs(value))]


def answer_atoms(rounds: list[RefineRound], with_offsets: bool) -> list[Atom]:
    """The answer for ``rounds`` as atoms; every answer of a given round count has the same layout."""
    atoms = [Atom("text", "From "), Atom("text", SEG_START), Atom("text", " ")]
    for i, round_ in enumerate(rounds):
        if i > 0:
            atoms += [Atom("text", " "), Atom("text", RETHINK), Atom("text", " ")]
        atoms += [*_number(round_.start), Atom("text", " to "), *_number(round_.end)]
        if with_offsets:
            atoms += [Atom("text", " "), Atom("text", OFFSET), Atom("text", " ")]
            start_sign, end_sign = round_.zero_signs
            atoms += [
                *_signed(round_.offset_start, start_sign),
                Atom("text", " and "),
                *_signed(round_.offset_end, end_sign),
            ]
    return [*atoms, Atom("text", " "), Atom("text", SEG_END), Atom("text", ".")]


def answer_layout(schedule: RefineSchedule) -> list[Atom]:
    """The atom layout of any answer of ``schedule`` (slot values are 0)."""
    return answer_atoms([RefineRound(0, 0)] * schedule.num_rounds, schedule.with_offsets)


def format_answer(rounds: list[RefineRound], with_offsets: bool) -> str:
    return "".join(atom.text for atom in answer_atoms(rounds, with_offsets))


_SEGMENT = re.compile(
    r"\s*(\d{1,2})\s*to\s*(\d{1,2})(?:\s*"
    + re.escape(OFFSET)
    + r"\s*([+-])\s*(\d{1,2})\s*and\s*([+-])\s*(\d{1,2}))?\s*"
)


def parse_answer(text: str) -> list[RefineRound]:
    """Every round that parses, in order; an empty list when nothing does.

    Reads after ``<SEG_START>`` (when present) up to ``<SEG_END>``. Without ``<SEG_END>`` the
    generation was cut short and only the rounds closed by ``<RETHINK>`` count. Each round must be
    exactly ``s to e`` (optionally ``<OFFSET> +a and -b``); a round without offsets gets zero offsets.
    The sign of an offset of zero is kept (``-00``).
    """
    body = text.split(SEG_START, 1)[-1]
    chunks = body.split(SEG_END, 1)[0].split(RETHINK)
    if SEG_END not in body:
        chunks = chunks[:-1]  # cut short: the last round may end mid-number or before its offsets
    rounds = []
    for chunk in chunks:
        match = _SEGMENT.fullmatch(chunk)
        if match is None:
            break
        start, end, sign_s, off_s, sign_e, off_e = match.groups()
        offset_start = int(sign_s + off_s) if off_s is not None else 0
        offset_end = int(sign_e + off_e) if off_e is not None else 0
        zero_signs = "".join(
            "-" if (sign, value) == ("-", 0) else "+"
            for sign, value in ((sign_s, offset_start), (sign_e, offset_end))
        )
        rounds.append(RefineRound(int(start), int(end), offset_start, offset_end, zero_signs))
    return rounds


def spaced(text: str) -> str:
    """Generated text with one space around each marker (tokenizers may fold those spaces away)."""
    for marker in (SEG_START, OFFSET, RETHINK):
        text = re.sub(r"\s*" + re.escape(marker) + r"\s*", f" {marker} ", text)
    return re.sub(r"\s*" + re.escape(SEG_END), f" {SEG_END}", text).strip()


def ordered_clipped(segment: tuple[float, float]) -> tuple[float, float]:
    """A segment with its ends inside ``[0, 99]`` and ``start <= end``."""
    start, end = (min(max(x, 0), MAX_INDEX) for x in segment)
    return (start, end) if start <= end else (end, start)


def predicted_segments(
    rounds: list[RefineRound], num_segments: int, order_and_clip: bool = True
) -> list[tuple[float, float]]:
    """The predictions along the refinement path: the first coarse segment, then each round's
    refined one; at most ``num_segments`` (``RefineSchedule.num_segments``: 1 for a direct answer,
    whose one segment is its coarse one), fewer when the generation was cut short. Each is ordered
    and clipped to the indices, unless ``order_and_clip`` is off (the official evaluation: a refined
    segment stays as written, start + offset may leave the video or pass its end)."""
    if not rounds:
        return []
    keep = ordered_clipped if order_and_clip else tuple
    return [keep((rounds[0].start, rounds[0].end)), *(keep(round_.refined) for round_ in rounds)][
        :num_segments
    ]
