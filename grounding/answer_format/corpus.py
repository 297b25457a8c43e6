"""The text a locally trained tokenizer learns from: the prompts and sample answers of the run's schedule."""

from __future__ import annotations

from grounding.answer_format.layout import format_answer
from grounding.answer_format.targets import RefineSchedule, make_target_rounds, sample_rng

SAMPLE_ANSWERS = 200


def tokenizer_corpus(prompts: list[str], durations: list[float], schedule: RefineSchedule) -> list[str]:
    """``prompts``, then one sample answer of ``schedule`` per duration (the first ``SAMPLE_ANSWERS``)."""
    answers = [
        format_answer(
            make_target_rounds((i % 50, 50 + i % 50), duration, schedule, sample_rng(0, 0, i)),
            schedule.with_offsets,
        )
        for i, duration in enumerate(durations[:SAMPLE_ANSWERS])
    ]
    return [*prompts, *answers]
