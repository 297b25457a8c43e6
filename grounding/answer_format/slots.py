"""The unit of constrained decoding: a run of fixed tokens, or a choice among token sequences."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Slot:
    """``fixed`` token ids to copy, or ``choices``: the token sequences of the values a digit, a
    sign or a number can take (one per value, in value order), of which decoding picks the best."""

    fixed: tuple[int, ...] = ()
    choices: tuple[tuple[int, ...], ...] = ()

    @property
    def length(self) -> int:
        """The most tokens this slot writes."""
        return len(self.fixed) or max(map(len, self.choices))
