"""Batching: prompt with frame placeholders, TimeRefine answer targets, and the loss mask.

Only answer tokens and the answer's end token (``codec.end_id``: EOS, or a chat format's end of
turn) carry LM loss; prompt, video placeholders and padding are ``IGNORE_INDEX``. Training
sequences are right-padded; the prompts for generation are left-padded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, TypeVar

import torch

from grounding.answer_format.chat import prompt_bos
from grounding.answer_format.codec import AnswerCodec
from grounding.answer_format.prompt_ids import (
    encode_prompt,
    special_texts,
    special_token_error,
    video_placeholder_id,
    video_span,
)
from grounding.answer_format.targets import RefineRound, draw_target_rounds, on_policy_draw, target_rng
from grounding.answer_format.timeline import DEFAULT_TIMELINE, Timeline
from grounding.answer_format.tokens import IGNORE_INDEX
from grounding.records import GroundingRecord

T = TypeVar("T")


class Opaque(Generic[T]):
    """Items that Lightning's input conversion passes as they are: a precision plugin (``bf16-true``,
    ``16-true``, ``64-true``) rebuilds every sequence of a batch and refuses the frozen dataclasses in
    it (``GroundingRecord``). Iterated, indexed and counted as the tuple it holds."""

    __slots__ = ("items",)

    def __init__(self, items: Iterable[T]) -> None:
        self.items = tuple(items)

    def __iter__(self) -> Iterator[T]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> T:
        return self.items[index]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Opaque) and self.items == other.items

    __hash__ = None  # type: ignore[assignment]


CoarseLookup = Callable[[str], tuple[int, int] | None]
MAX_ENCODED = 100_000  # prompts a collator keeps encoded, so later epochs do not tokenize them again


class GroundingCollator:
    """Turns dataset items into model batches; ``codec`` (shared with the module) holds the
    tokenizer and the refinement schedule of the targets.

    ``coarse_lookup`` maps a qid to the model's own coarse guess, used as the first coarse segment
    with probability ``on_policy_fraction`` (on-policy refinement), drawn per (seed, epoch, sample).
    ``timeline`` (``data.timeline``) maps the ground truth in seconds to the answer's indices.
    ``video_stamps``: the ids written before each video token (its timestamp), if any.
    """

    def __init__(
        self,
        codec: AnswerCodec,
        prompt: Callable[[str], str],
        video_tokens: int,
        seed: int = 0,
        coarse_lookup: CoarseLookup | None = None,
        timeline: Timeline = DEFAULT_TIMELINE,
        on_policy_fraction: float = 1.0,
        video_stamps: Sequence[Sequence[int]] | None = None,
    ) -> None:
        self.codec, self.tokenizer, self.prompt = codec, codec.tokenizer, prompt
        self.video_tokens, self.seed, self.coarse_lookup = video_tokens, seed, coarse_lookup
        self.timeline, self.on_policy_fraction = timeline, on_policy_fraction
        self.video_id = video_placeholder_id(self.tokenizer)
        self.video = video_span(self.video_id, video_tokens, video_stamps)
        self.encoded: dict[str, list[int]] = {}  # query -> prompt ids, read-only
        self.special_texts = special_texts(self.tokenizer)  # a pattern that finds any of them

    def special_token_error(self, query: str) -> str | None:
        """Why ``query`` cannot fill a prompt: it spells a special token of the tokenizer, which the
        prompt would hold as that token; None when it spells none."""
        return special_token_error(self.special_texts, query)

    def prompt_ids(self, query: str) -> list[int]:
        if (known := self.encoded.get(query)) is not None:
            return known
        ids = encode_prompt(self.tokenizer, self.prompt(query), self.video_id)
        bos = prompt_bos(self.tokenizer)
        if bos is not None and ids[:1] != [bos]:  # once, also when a chat template writes it
            ids = [bos, *ids]
        at = ids.index(self.video_id)
        ids = [*ids[:at], *self.video, *ids[at + 1 :]]
        if len(self.encoded) < MAX_ENCODED:
            self.encoded[query] = ids
        return ids

    def target_rounds(self, record: GroundingRecord, epoch: int, index: int) -> list[RefineRound]:
        schedule, first = self.codec.schedule, None
        if self.coarse_lookup and on_policy_draw(self.seed, epoch, index) < self.on_policy_fraction:
            first = self.coarse_lookup(record.qid)
        rng = target_rng(self.seed, epoch, index, schedule.resample)
        gt = (record.start, record.end)
        return draw_target_rounds(gt, record.duration, schedule, self.timeline, rng, first)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        records = [item["record"] for item in items]
        prompts = [self.prompt_ids(r.query) for r in records]
        answers = [
            [
                *self.codec.encode(self.target_rounds(r, item["epoch"], item["index"])),
                self.codec.end_id,
            ]
            for r, item in zip(records, items, strict=True)
        ]
        pad = self.tokenizer.pad_token_id
        full_len = max(len(p) + len(a) for p, a in zip(prompts, answers, strict=True))
        input_ids = torch.full((len(items), full_len), pad, dtype=torch.long)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        attention = torch.zeros_like(input_ids)
        prompt_len = max(len(p) for p in prompts)
        prompt_ids = torch.full((len(items), prompt_len), pad, dtype=torch.long)
        prompt_mask = torch.zeros_like(prompt_ids)
        for row, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
            sequence = prompt + answer
            input_ids[row, : len(sequence)] = torch.tensor(sequence)
            labels[row, len(prompt) : len(sequence)] = torch.tensor(answer)
            attention[row, : len(sequence)] = 1
            prompt_ids[row, prompt_len - len(prompt) :] = torch.tensor(prompt)
            prompt_mask[row, prompt_len - len(prompt) :] = 1
        return {
            "features": torch.stack([item["features"] for item in items]),
            "input_ids": input_ids,
            "attention_mask": attention,
            "labels": labels,
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "gt_norm": torch.tensor([[r.start / r.duration, r.end / r.duration] for r in records]),
            "records": Opaque(records),
        }
