"""How answers are decoded and read at evaluation: the greedy decoders and the inference settings."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from grounding.answer_format.predictions import FINAL_CHOICES
from grounding.checks import Checked, checked, integer, one_of, optional
from lightning_modules.generation import generate
from lightning_modules.hf_generation import hf_generate

# The greedy decoders, which give the same answers: the project's (fused forward passes, each
# choice's token with the fixed text after it) and Hugging Face generate() with a SlotLogitsProcessor.
DECODERS = {"fused": generate, "generate": hf_generate}


@dataclass
class InferenceSpec(Checked):
    """``final``: last refined segment, aux-head prediction (at the last <OFFSET>, or ``_all``: its
    mean over every <OFFSET>, as the official evaluation), or their mean (FINAL_CHOICES).
    ``constrained``: fill the fixed tokens in and let the model choose only digits and signs.
    ``decoder``: a name from ``DECODERS``. ``order_and_clip``: order every predicted segment and clip
    it to the video; off, a segment is scored as written (the official evaluation)."""

    final: str = checked("last", one_of(*FINAL_CHOICES))
    constrained: bool = True
    max_new_tokens: int | None = checked(None, optional(integer(1)))
    decoder: str = checked("fused", one_of(*DECODERS))
    order_and_clip: bool = True

    def relations(self) -> Iterator[str]:
        if self.constrained and self.max_new_tokens is not None:
            yield (
                f"max_new_tokens={self.max_new_tokens} needs constrained=false: constrained decoding "
                "writes the whole answer layout, whatever the limit"
            )

    def new_tokens(self, answer_length: int) -> int:
        """The most tokens a generated answer may take, answers being ``answer_length`` tokens long."""
        return self.max_new_tokens or answer_length + 8
