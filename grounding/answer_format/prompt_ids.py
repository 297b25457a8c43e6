"""A prompt as token ids, with one placeholder id where its ``<video>`` is.

With a ``<video>`` token (``model.lm.grounding_tokens=project``) the prompt is encoded whole. Without
one (``reference``) the placeholder is ``VIDEO_INDEX``, outside the vocabulary, and the text on each
side of ``<video>`` is encoded on its own, as LLaVA and VTimeLLM encode a prompt: a SentencePiece
tokenizer then starts the text after the video afresh (``▁`` before its leading newline).
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from grounding.answer_format.tokens import VIDEO, VIDEO_INDEX


def video_placeholder_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that stands for the video in a prompt: the ``<video>`` token's, else ``VIDEO_INDEX``."""
    return tokenizer.get_added_vocab().get(VIDEO, VIDEO_INDEX)


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
