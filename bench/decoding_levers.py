"""This project's decoders as ``bench/decoding.py`` runs them: the default constrained decoding on a
chosen ``Decoder`` (the static-cache and eager variants), and adaptive refinement depth."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import StaticCache

from grounding.answer_format.codec import Slot
from grounding.answer_format.timeline import MAX_INDEX
from lightning_modules.generation import Decoder, Generation, constrained, generate
from lightning_modules.grounding_module import GroundingModule

CHOICES_PER_ROUND = 10  # start, end (2 digits each); two signed offsets (sign + 2 digits each)
DecoderRun = Callable[[GroundingModule, dict], Generation]


def project_generate(
    module: GroundingModule, batch: dict, constrained: bool, eos_id: int, budget: int
) -> Generation:
    """The project's ``generate`` on a test batch: constrained on the codec's slots, or free."""
    return generate(
        module.model,
        batch["prompt_ids"],
        batch["prompt_mask"],
        batch["features"],
        eos_id=eos_id,
        max_new_tokens=budget,
        slots=module.codec.slots() if constrained else None,
        offset_id=module.offset_id if module.model.aux_head is not None else None,
    )


def static_cache_decoder(answer_length: int) -> type[Decoder]:
    """The project's decoder on a static KV cache (preallocated for the prompt and the answer,
    written in place) instead of Hugging Face's DynamicCache (grown by concatenation every pass)."""

    class StaticCacheDecoder(Decoder):
        def __init__(self, model, prompt_ids, *args) -> None:
            length = prompt_ids.shape[1] + answer_length
            super().__init__(
                model, prompt_ids, *args, StaticCache(config=model.lm.config, max_cache_len=length)
            )

    return StaticCacheDecoder


class EagerDecoder(Decoder):
    """The project's decoding before this benchmark: every feed runs at once (one pass for the
    prompt, one per chosen token, one per fixed run)."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.run()

    def feed(self, tokens: torch.Tensor, fed: torch.Tensor | None = None) -> None:
        super().feed(tokens, fed)
        self.run()


def constrained_with(decoder_type: type[Decoder]) -> DecoderRun:
    """The project's constrained decoding (``generation.constrained``) on ``decoder_type``."""

    @torch.no_grad()
    def run(module: GroundingModule, batch: dict) -> Generation:
        decoder = _start(module, batch, decoder_type)
        tokens = constrained(decoder, module.codec.slots())
        decoder.finish()
        return Generation(tokens, decoder.offset_hidden, decoder.has_offset)

    return run


def _start(module: GroundingModule, batch: dict, decoder_type: type[Decoder] = Decoder) -> Decoder:
    offset_id = module.offset_id if module.model.aux_head is not None else None
    return decoder_type(module.model, batch["prompt_ids"], batch["prompt_mask"], batch["features"], offset_id)


def single_tokens(slot: Slot) -> list[int]:
    """A choice slot's tokens (``model.answer_tokens=digits``: every digit and sign is one token)."""
    if any(len(choice) != 1 for choice in slot.choices):
        raise SystemExit("error: this benchmark's adaptive and HF decoders need model.answer_tokens=digits")
    return [token for (token,) in slot.choices]


def _slot_step(decoder: Decoder, slot: Slot, rows: int) -> torch.Tensor:
    if slot.fixed:
        return torch.tensor(slot.fixed).expand(rows, -1)
    choices = torch.tensor(single_tokens(slot))
    return choices[decoder.last_logits[:, choices].argmax(-1)].unsqueeze(1)


def _value(chars: list[str]) -> int:
    """A number from its chosen characters: ``[tens, ones]`` or ``[sign, tens, ones]``."""
    sign = -1 if chars[0] == "-" else 1
    return sign * int("".join(c for c in chars if c.isdigit()))


@torch.no_grad()
def adaptive(module: GroundingModule, batch: dict, tolerance: int = 0) -> tuple[Generation, list[int]]:
    """Constrained decoding that stops refining a query once a round's two offsets are within
    ``tolerance`` frames of zero (0: ``+00 and +00``), and how many of the K + 1 rounds each query
    skipped. The rest is filled in without the model: that round's refined segment (coarse +
    offsets, clipped to the timeline) in every later round, with zero offsets."""
    slots, codec = module.codec.slots(), module.codec
    rows, steps = len(batch["records"]), codec.schedule.steps
    choice_slots = [i for i, slot in enumerate(slots) if slot.choices]
    if steps == 0:
        return project_generate(module, batch, True, -1, 0), [0] * rows
    assert len(choice_slots) == CHOICES_PER_ROUND * (steps + 1), "unexpected answer layout"
    char_of = {token: char for char, token in codec.char_ids.items()}
    decoder = _start(module, batch)
    active = torch.arange(rows)
    tokens: list[list[int]] = [[] for _ in range(rows)]
    chosen: list[list[str]] = [[] for _ in range(rows)]  # each row's chosen characters so far
    hidden_size = module.model.lm.config.hidden_size
    offset_hidden = torch.zeros(rows, hidden_size)
    has_offset = torch.zeros(rows, dtype=torch.bool)
    skipped = [0] * rows

    def keep_aux_state(positions: torch.Tensor, at: torch.Tensor) -> None:
        if decoder.offset_hidden is not None:
            offset_hidden[at] = decoder.offset_hidden[positions].float()
            has_offset[at] = decoder.has_offset[positions]

    for index, slot in enumerate(slots):
        step = _slot_step(decoder, slot, len(active))
        decoder.feed(step)
        for row, values in zip(active.tolist(), step.tolist(), strict=True):
            tokens[row] += values
            if slot.choices:
                chosen[row] += [char_of[v] for v in values]
        done = len(chosen[active[0]])
        if not slot.choices or done % CHOICES_PER_ROUND or done == CHOICES_PER_ROUND * (steps + 1):
            continue
        stop = torch.zeros(len(active), dtype=torch.bool)
        for position, row in enumerate(active.tolist()):
            last = chosen[row][-CHOICES_PER_ROUND:]  # start, end (2 digits each), 2 signed offsets
            start, end, shift_start, shift_end = (
                _value(last[0:2]),
                _value(last[2:4]),
                _value(last[4:7]),
                _value(last[7:10]),
            )
            if max(abs(shift_start), abs(shift_end)) > tolerance:
                continue
            stop[position] = True
            refined = [min(max(x, 0), MAX_INDEX) for x in (start + shift_start, end + shift_end)]
            fill = [*f"{refined[0]:02d}{refined[1]:02d}", "+", "0", "0", "+", "0", "0"]
            filler = {i: codec.char_ids[fill[n % CHOICES_PER_ROUND]] for n, i in enumerate(choice_slots)}
            tokens[row] += [t for i in range(index + 1, len(slots)) for t in (slots[i].fixed or (filler[i],))]
            skipped[row] = steps + 1 - done // CHOICES_PER_ROUND
        if not stop.any():
            continue
        keep_aux_state(stop.nonzero().flatten(), active[stop])
        keep = (~stop).nonzero().flatten()
        active = active[keep]
        if not len(active):
            break
        decoder.keep_rows(keep)
    decoder.finish()
    if len(active):
        keep_aux_state(torch.arange(len(active)), active)
    hidden = offset_hidden if module.offset_id is not None and module.model.aux_head is not None else None
    return Generation(tokens, hidden, has_offset), skipped
