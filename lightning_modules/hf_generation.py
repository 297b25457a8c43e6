"""Greedy answers from Hugging Face ``generate()`` on the spliced prompt embeddings: free, or
constrained to the answer layout by :class:`SlotLogitsProcessor`. The same answers as the project's
decoder (``generation.generate``); ``model.inference.decoder`` picks one."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import GenerationConfig, GenerationMixin, LogitsProcessorList

from grounding.answer_format.slots import Slot
from lightning_modules.generation import Generation, choosable_placeholder, is_sharded
from lightning_modules.slot_logits_processor import SlotLogitsProcessor
from lightning_modules.video_llm import VideoLLM


@torch.no_grad()
def hf_generate(
    model: VideoLLM,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    features: torch.Tensor,
    eos_id: int,
    max_new_tokens: int,
    slots: list[Slot] | None = None,
    offset_id: int | None = None,
    **options: Any,
) -> Generation:
    """Greedy answers; with ``slots`` only the choice slots are chosen and every answer parses.
    ``options``: more ``generate()`` arguments (e.g. ``cache_implementation``). The LM's own
    generation defaults (repetition penalty, n-gram blocking, a minimum length, ...) are set aside.
    """
    processors = LogitsProcessorList()
    if slots is not None:
        processors.append(SlotLogitsProcessor(slots, eos_id))
        max_new_tokens = processors[0].max_new_tokens
    elif offset_id is not None:
        max_new_tokens += 1  # so that the last token is fed too, and its hidden state known
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=eos_id,
        pad_token_id=eos_id,  # written after the end token, cut off with it
        return_dict_in_generate=True,
        output_hidden_states=offset_id is not None,
        suppress_tokens=None if (placeholder := choosable_placeholder(model)) is None else [placeholder],
    )
    with without_generation_defaults(model.lm):
        out = model.lm.generate(
            inputs_embeds=model.embed(prompt_ids, features, prompt_mask),
            attention_mask=prompt_mask,
            generation_config=config,
            logits_processor=processors,
            synced_gpus=is_sharded(model),
            **options,
        )
    rows = out.sequences.tolist()
    limit = max_new_tokens - (offset_id is not None and slots is None)
    tokens = [row[: row.index(eos_id)] if eos_id in row[:limit] else row[:limit] for row in rows]
    if offset_id is None:
        return Generation(tokens, None, torch.zeros(len(rows), dtype=torch.bool, device=prompt_ids.device))
    return _offset_state(out, tokens, offset_id)


@contextmanager
def without_generation_defaults(lm: torch.nn.Module) -> Iterator[None]:
    """``lm`` (or the Hugging Face model inside its PEFT wrapper) with a blank ``generation_config``
    while in the block: ``generate()`` fills every option a call leaves unset from the model's own."""
    model = next(module for module in lm.modules() if isinstance(module, GenerationMixin))
    own, model.generation_config = model.generation_config, GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = own


def _offset_state(out, tokens: list[list[int]], offset_id: int) -> Generation:
    """The last hidden state at each answer's last <OFFSET> (generated token ``i`` is fed at step ``i + 1``;
    none is fed where every answer ends at its first token)."""
    prompt = out.hidden_states[0][-1]  # (B, prompt length, H)
    fed = torch.cat([prompt[:, :0], *(step[-1][:, -1:] for step in out.hidden_states[1:])], dim=1)
    hidden = fed.new_zeros(fed.shape[0], fed.shape[-1])
    has_offset = torch.zeros(fed.shape[0], dtype=torch.bool, device=fed.device)
    states: list[torch.Tensor | None] = []
    for row, answer in enumerate(tokens):
        at = [i for i, token in enumerate(answer) if token == offset_id]
        states.append(fed[row, at] if at else None)
        if at:
            hidden[row] = fed[row, at[-1]]
            has_offset[row] = True
    return Generation(tokens, hidden, has_offset, states)
