"""Canonical answer tokens: the tokenizer's own ids for the whole answer text, and the slots that
let constrained decoding write exactly those ids.

A tokenizer may merge a number with its neighbours (GPT-2 writes `` 36`` as one token, Llama-3
writes ``36``), so a choice slot covers a *field* (a number, or a sign and a number) together with
the tokens around it that change with the field's value. That window is found by encoding the
answer once per value of the field and trimming the tokens every variant shares with the base
answer; the slot's choices are the windows' token sequences, one per value.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence

from grounding.answer_format.layout import Atom
from grounding.answer_format.slots import Slot
from grounding.answer_format.tokens import DIGITS, SIGNS

Encode = Callable[[list[str]], list[list[int]]]  # texts -> their token ids, no special tokens added
CHECKED_SAMPLES = 20


def _fields(atoms: Sequence[Atom]) -> list[tuple[int, int]]:
    """The atom ranges of the maximal runs of digits and signs."""
    fields, start = [], None
    for i, atom in enumerate([*atoms, Atom("text", "")]):
        if atom.kind != "text" and start is None:
            start = i
        elif atom.kind == "text" and start is not None:
            fields.append((start, i))
            start = None
    return fields


def _values(atoms: Sequence[Atom]) -> list[str]:
    """Every text a field can hold, in a fixed order (signs ``+-``, digits ``0-9``)."""
    charsets = [DIGITS if atom.kind == "digit" else SIGNS for atom in atoms]
    return ["".join(chars) for chars in itertools.product(*charsets)]


def _shared(base: list[int], ids: list[int]) -> tuple[int, int]:
    """How many leading and trailing tokens ``ids`` shares with ``base`` (not overlapping)."""
    head = 0
    while head < min(len(base), len(ids)) and base[head] == ids[head]:
        head += 1
    tail = 0
    while tail < min(len(base), len(ids)) - head and base[-1 - tail] == ids[-1 - tail]:
        tail += 1
    return head, tail


def canonical_slots(layout: Sequence[Atom], encode: Encode) -> list[Slot]:
    """Fixed token runs and one choice slot per field of ``layout``; the choices of a field are in
    the order of its values. Raises ValueError when two fields' windows overlap."""
    texts = [atom.text for atom in layout]
    base = encode(["".join(texts)])[0]
    slots: list[Slot] = []
    done = 0
    for i, j in _fields(layout):
        before, after = "".join(texts[:i]), "".join(texts[j:])
        variants = encode([before + value + after for value in _values(layout[i:j])])
        shared = [_shared(base, ids) for ids in variants if ids != base]
        head, tail = min(h for h, _ in shared), min(t for _, t in shared)
        if head < done:
            raise ValueError("the tokenizer merges two numbers of the answer into one token")
        if head > done:
            slots.append(Slot(fixed=tuple(base[done:head])))
        slots.append(Slot(choices=tuple(tuple(ids[head : len(ids) - tail]) for ids in variants)))
        done = len(base) - tail
    if done < len(base):
        slots.append(Slot(fixed=tuple(base[done:])))
    return slots


def fill(slots: Sequence[Slot], layout: Sequence[Atom], atoms: Sequence[Atom]) -> list[int]:
    """The ids that ``slots`` (made from ``layout``) give the answer ``atoms`` (same layout)."""
    values = iter(_values(layout[i:j]).index("".join(a.text for a in atoms[i:j])) for i, j in _fields(atoms))
    return [token for slot in slots for token in (slot.fixed or slot.choices[next(values)])]


def check_canonical(slots: Sequence[Slot], layout: Sequence[Atom], encode: Encode) -> None:
    """Raise ValueError unless ``slots`` reproduce the tokenizer's ids for answers of random values."""
    rng = random.Random(0)
    for _ in range(CHECKED_SAMPLES):
        atoms = [
            a if a.kind == "text" else Atom(a.kind, rng.choice(DIGITS if a.kind == "digit" else SIGNS))
            for a in layout
        ]
        text = "".join(a.text for a in atoms)
        if fill(slots, layout, atoms) != encode([text])[0]:
            raise ValueError(f"the tokenizer's ids for {text!r} depend on more than one number at a time")
