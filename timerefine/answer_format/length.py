"""Whether a prompt and its answer fit the language model's positions (training and prediction)."""

from __future__ import annotations


def too_long(prompt_tokens: int, answer_tokens: int, max_positions: int | None) -> str | None:
    """Why a prompt of ``prompt_tokens`` (video placeholders included) followed by an answer of up to
    ``answer_tokens`` does not fit an LM of ``max_positions`` positions; None when it fits or the LM
    names no limit."""
    total = prompt_tokens + answer_tokens
    if max_positions is None or total <= max_positions:
        return None
    return (
        f"query too long: {total} tokens with its prompt, video tokens and answer > "
        f"{max_positions} positions of the LM"
    )
