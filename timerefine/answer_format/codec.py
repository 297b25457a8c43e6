"""Answer <-> token ids, so training targets and constrained decoding agree exactly.

Each run of fixed text is encoded as one string; every digit and sign is its own single token.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from timerefine.answer_format.layout import Atom, answer_atoms, answer_layout
from timerefine.answer_format.targets import RefineRound, RefineSchedule
from timerefine.answer_format.tokens import DIGITS, SIGNS


@dataclass(frozen=True)
class Slot:
    """A decoding position: ``fixed`` token ids to copy, or ``choices`` to pick the best one from.

    While encoding a concrete answer, a digit/sign slot carries both (its value in ``fixed``).
    """

    fixed: tuple[int, ...] = ()
    choices: tuple[int, ...] = ()


class AnswerCodec:
    """Encodes the answers of ``schedule`` and describes their token layout. One instance per run
    serves the collator (training targets) and the module (decoding, parsing, metrics)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, schedule: RefineSchedule) -> None:
        self.tokenizer, self.schedule = tokenizer, schedule
        self.char_ids = {char: tokenizer.convert_tokens_to_ids(char) for char in DIGITS + SIGNS}
        self._text_cache: dict[str, list[int]] = {}

    def _text_ids(self, text: str) -> list[int]:
        if text not in self._text_cache:
            self._text_cache[text] = self.tokenizer.encode(text, add_special_tokens=False)
        return self._text_cache[text]

    def _runs(self, atoms: list[Atom]) -> list[Slot]:
        """Maximal runs of text atoms become one fixed slot (encoded together); each digit/sign is a slot."""
        slots: list[Slot] = []
        text = ""
        for atom in [*atoms, Atom("sign", "+")]:  # sentinel flushes the last text run
            if atom.kind == "text":
                text += atom.text
                continue
            if text:
                slots.append(Slot(fixed=tuple(self._text_ids(text))))
                text = ""
            charset = DIGITS if atom.kind == "digit" else SIGNS
            slots.append(
                Slot(fixed=(self.char_ids[atom.text],), choices=tuple(self.char_ids[c] for c in charset))
            )
        return slots[:-1]

    def encode(self, rounds: list[RefineRound]) -> list[int]:
        """Token ids of the answer for ``rounds`` (no EOS)."""
        atoms = answer_atoms(rounds, self.schedule.with_offsets)
        return [token for slot in self._runs(atoms) for token in slot.fixed]

    def slots(self) -> list[Slot]:
        """The layout for constrained decoding: fixed runs of text, and one choice per digit or sign."""
        return [
            slot if not slot.choices else Slot(choices=slot.choices)
            for slot in self._runs(answer_layout(self.schedule))
        ]

    def answer_length(self) -> int:
        return sum(len(slot.fixed) or 1 for slot in self.slots())
