"""Answer <-> token ids, atom by atom, so training targets and constrained decoding agree exactly."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from datamodules.answer import Atom, answer_atoms, answer_layout
from datamodules.targets import RefineStep

DIGITS, SIGNS = "0123456789", "+-"


@dataclass(frozen=True)
class Slot:
    """A decoding position: ``fixed`` token ids to copy, or ``choices`` to pick the best one from."""

    fixed: tuple[int, ...] = ()
    choices: tuple[int, ...] = ()


class AnswerCodec:
    """Encodes answers with ``refine_steps`` refinement steps and describes their token layout."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, refine_steps: int) -> None:
        self.tokenizer, self.refine_steps = tokenizer, refine_steps
        self.char_ids = {char: tokenizer.convert_tokens_to_ids(char) for char in DIGITS + SIGNS}
        self._text_ids: dict[str, list[int]] = {}

    def _atom_ids(self, atom: Atom) -> list[int]:
        if atom.kind != "text":
            return [self.char_ids[atom.text]]
        if atom.text not in self._text_ids:
            self._text_ids[atom.text] = self.tokenizer.encode(atom.text, add_special_tokens=False)
        return self._text_ids[atom.text]

    def encode(self, steps: list[RefineStep]) -> list[int]:
        """Token ids of the answer for ``steps`` (no EOS)."""
        atoms = answer_atoms(steps, with_offsets=self.refine_steps > 0)
        return [token for atom in atoms for token in self._atom_ids(atom)]

    def slots(self) -> list[Slot]:
        """The layout for constrained decoding: runs of fixed ids, and one slot per digit or sign."""
        slots: list[Slot] = []
        for atom in answer_layout(self.refine_steps):
            if atom.kind == "text":
                ids = tuple(self._atom_ids(atom))
                if slots and slots[-1].fixed:
                    slots[-1] = Slot(fixed=slots[-1].fixed + ids)
                else:
                    slots.append(Slot(fixed=ids))
            else:
                charset = DIGITS if atom.kind == "digit" else SIGNS
                slots.append(Slot(choices=tuple(self.char_ids[c] for c in charset)))
        return slots

    def answer_length(self) -> int:
        return sum(len(slot.fixed) or 1 for slot in self.slots())
