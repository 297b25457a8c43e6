"""A prompt as token ids, with one placeholder id where its ``<video>`` is.

With a ``<video>`` token (``model.lm.grounding_tokens=project``) the prompt is encoded whole. Without
one (``reference``) the placeholder is ``VIDEO_INDEX``, outside the vocabulary, and the text on each
side of ``<video>`` is encoded on its own, as LLaVA and VTimeLLM encode a prompt: a SentencePiece
tokenizer then starts the text after the video afresh (``▁`` before its leading newline).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from grounding.answer_format.codec import AnswerCodec
from grounding.answer_format.prompts import normalize_query
from grounding.answer_format.timeline import Timeline
from grounding.answer_format.tokens import VIDEO, VIDEO_INDEX


def video_placeholder_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that stands for the video in a prompt: the ``<video>`` token's, else ``VIDEO_INDEX``."""
    return tokenizer.get_added_vocab().get(VIDEO, VIDEO_INDEX)


def special_texts(tokenizer: PreTrainedTokenizerBase) -> re.Pattern[str]:
    """A pattern that finds the text of any of ``tokenizer``'s special tokens (``</s>``, ``<|im_end|>``)."""
    specials = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    return re.compile("|".join(re.escape(text) for text in sorted(specials, key=len, reverse=True)) or "(?!)")


def special_token_error(specials: re.Pattern[str], query: str) -> str | None:
    """Why ``query`` cannot fill a prompt when, normalised, it spells a special token's text (found by
    :func:`special_texts`): encoded with its prompt, it would be that token (an end of text, of the
    user's turn), not words; None when it spells none."""
    found = specials.search(normalize_query(query))
    return (
        found
        and f"the query holds {found.group()!r}, which the tokenizer reads as its special token, not as text"
    )


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str, placeholder: int | None = None) -> list[int]:
    """``text``'s ids (no special tokens added) with one ``placeholder`` (default: the tokenizer's)
    for its ``<video>``; ValueError unless ``text`` holds ``<video>`` exactly once."""
    if text.count(VIDEO) != 1:
        raise ValueError(f"the prompt template must contain '{VIDEO}' exactly once: {text!r}")
    placeholder = video_placeholder_id(tokenizer) if placeholder is None else placeholder
    if placeholder != VIDEO_INDEX:
        return tokenizer.encode(text, add_special_tokens=False)
    before, after = (tokenizer.encode(part, add_special_tokens=False) for part in text.split(VIDEO))
    return [*before, VIDEO_INDEX, *after]


def video_span(
    placeholder: int, video_tokens: int, stamps: Sequence[Sequence[int]] | None = None
) -> list[int]:
    """What a prompt's ``<video>`` becomes: one ``placeholder`` per video token, each after its
    timestamp's ids where ``stamps`` (one per video token) are given."""
    if stamps is None:
        return [placeholder] * video_tokens
    if len(stamps) != video_tokens:
        raise ValueError(f"{len(stamps)} timestamps for {video_tokens} video tokens")
    return [token for stamp in stamps for token in (*stamp, placeholder)]


def timestamp_length(codec: AnswerCodec) -> int:
    """How many tokens a text timestamp takes; ValueError unless every 00-99 takes as many."""
    lengths = {len(codec.number_ids(value)) for value in range(100)}
    if len(lengths) > 1:
        raise ValueError(
            "text timestamps (projector.temporal_embedding=text) need numbers of one length, but "
            f"answer_tokens={codec.answer_tokens} writes 00-99 in {sorted(lengths)} tokens: "
            "use answer_tokens=digits"
        )
    return lengths.pop()


def video_timestamps(codec: AnswerCodec, video_tokens: int, timeline: Timeline) -> list[list[int]]:
    """Each video token's index on ``timeline``, in the ids ``codec``'s answers write it with
    (``model.projector.temporal_embedding=text``); ValueError as :func:`timestamp_length`."""
    timestamp_length(codec)
    return [codec.number_ids(timeline.frame_index(i, video_tokens)) for i in range(video_tokens)]
