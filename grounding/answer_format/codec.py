"""Answer <-> token ids, so training targets and constrained decoding agree exactly.

Two spellings of the answer (``model.answer_tokens``):

- ``digits``: each run of fixed text is encoded as one string and every digit and sign is its own
  single token, whatever the tokenizer would do with the number.
- ``canonical``: the tokenizer's own ids for the whole answer text (``36`` may be one token); each
  number's choice slot holds the token sequences of its 100 (or 200 signed) values
  (:mod:`grounding.answer_format.canonical`).
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from grounding.answer_format.canonical import canonical_slots, check_canonical
from grounding.answer_format.layout import Atom, answer_atoms, answer_layout, format_answer
from grounding.answer_format.slots import Slot
from grounding.answer_format.targets import RefineRound, RefineSchedule
from grounding.answer_format.tokens import DIGITS, SIGNS

ANSWER_TOKENS = ("digits", "canonical")
__all__ = ["ANSWER_TOKENS", "AnswerCodec", "Slot"]


class AnswerCodec:
    """Encodes the answers of ``schedule`` and describes their token layout. One instance per run
    serves the collator (training targets) and the module (decoding, parsing, metrics).

    ``answer_tokens``: ``digits`` or ``canonical`` (above). ``end_id``: the token that ends every
    answer (and free decoding); the tokenizer's EOS unless a chat format ends turns otherwise.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        schedule: RefineSchedule,
        answer_tokens: str = "digits",
        end_id: int | None = None,
    ) -> None:
        if answer_tokens not in ANSWER_TOKENS:
            raise ValueError(f"answer_tokens={answer_tokens!r}: choose from {', '.join(ANSWER_TOKENS)}")
        self.tokenizer, self.schedule, self.answer_tokens = tokenizer, schedule, answer_tokens
        self.end_id = tokenizer.eos_token_id if end_id is None else end_id
        self.char_ids = {char: tokenizer.convert_tokens_to_ids(char) for char in DIGITS + SIGNS}
        self._text_cache: dict[str, list[int]] = {}
        self._slots: list[Slot] | None = None

    def _encode_texts(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _text_ids(self, text: str) -> list[int]:
        if text not in self._text_cache:
            self._text_cache[text] = self.tokenizer.encode(text, add_special_tokens=False)
        return self._text_cache[text]

    def _digit_pieces(self, atoms: list[Atom]) -> list[tuple[str, list[int]]]:
        """(kind, ids): each maximal run of text atoms encoded together, each digit/sign one token."""
        pieces: list[tuple[str, list[int]]] = []
        text = ""
        for atom in [*atoms, Atom("sign", "+")]:  # sentinel flushes the last text run
            if atom.kind == "text":
                text += atom.text
                continue
            if text:
                pieces.append(("text", self._text_ids(text)))
                text = ""
            pieces.append((atom.kind, [self.char_ids[atom.text]]))
        return pieces[:-1]

    def encode(self, rounds: list[RefineRound]) -> list[int]:
        """Token ids of the answer for ``rounds`` (no end token)."""
        if self.answer_tokens == "canonical":
            return self._encode_texts([format_answer(rounds, self.schedule.with_offsets)])[0]
        atoms = answer_atoms(rounds, self.schedule.with_offsets)
        return [token for _, ids in self._digit_pieces(atoms) for token in ids]

    def slots(self) -> list[Slot]:
        """The layout for constrained decoding: fixed runs of tokens, and choice slots whose
        every pick yields exactly the ids :meth:`encode` gives that answer."""
        if self._slots is None:
            layout = answer_layout(self.schedule)
            if self.answer_tokens == "canonical":
                self._slots = canonical_slots(layout, self._encode_texts)
                check_canonical(self._slots, layout, self._encode_texts)
            else:
                self._slots = self._digit_slots(layout)
        return self._slots

    def _digit_slots(self, layout: list[Atom]) -> list[Slot]:
        return [
            Slot(fixed=tuple(ids))
            if kind == "text"
            else Slot(choices=tuple((self.char_ids[c],) for c in (DIGITS if kind == "digit" else SIGNS)))
            for kind, ids in self._digit_pieces(layout)
        ]

    def number_ids(self, value: int) -> list[int]:
        """The ids of the 00-99 number ``value`` as an answer's first number is written."""
        if not 0 <= value <= 99:
            raise ValueError(f"a timestamp is 00-99, got {value}")
        if self.answer_tokens == "digits":
            return [self.char_ids[digit] for digit in f"{value:02d}"]
        first = next(slot for slot in self.slots() if len(slot.choices) == 100)
        return list(first.choices[value])

    def answer_length(self) -> int:
        """The most tokens an answer takes (all of them do with ``digits``)."""
        return sum(slot.length for slot in self.slots())
