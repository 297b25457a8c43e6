"""Query normalisation and prompt rendering for grounding queries.

``data.prompt_template`` is a name from :data:`PROMPTS` or a template of its own; either way it
holds ``{query}`` and ``<video>``.
"""

from __future__ import annotations

from grounding.answer_format.tokens import VIDEO

DEFAULT_TEMPLATE = f"{VIDEO}\nAt which time interval in the video can we see {{query}} occurring?"
REFERENCE_TEMPLATE = f"{VIDEO}\nDuring which frames can we see {{query}}?"  # VTimeLLM's grounding question
PROMPTS = {"default": DEFAULT_TEMPLATE, "reference": REFERENCE_TEMPLATE}


def resolve_template(name_or_template: str) -> str:
    """The template a ``data.prompt_template`` value names, or the value itself when it is one."""
    return PROMPTS.get(name_or_template, name_or_template)


def template_error(name_or_template: str) -> str | None:
    """What keeps ``name_or_template`` from being a prompt template, or None."""
    template = resolve_template(name_or_template)
    missing = [p for p in ("{query}", VIDEO) if p not in template]
    if missing:
        return f"must be one of {', '.join(PROMPTS)} or a template holding {' and '.join(missing)}"
    return None


def normalize_query(text: str) -> str:
    """VTimeLLM-style: lowercase, collapse whitespace, drop trailing periods."""
    return " ".join(text.lower().split()).rstrip(".").rstrip()


def query_error(query: str) -> str | None:
    """Why ``query`` cannot fill a prompt: normalised, it holds ``<video>``, the place of the video
    tokens (other grounding tokens are upper case, which normalising takes from them); None if none."""
    if VIDEO in normalize_query(query):
        return f"the query holds {VIDEO}, the prompt's place for the video"
    return None


def render_prompt(template: str, query: str) -> str:
    """Fill ``{query}`` in ``template`` (which must also hold ``<video>``) with the normalised query."""
    for placeholder in ("{query}", VIDEO):
        if placeholder not in template:
            raise ValueError(f"prompt template lacks the {placeholder} placeholder: {template!r}")
    if error := query_error(query):
        raise ValueError(f"{error}: {query!r}")
    return template.replace("{query}", normalize_query(query))


def query_length_error(query_tokens: int, other_tokens: int, max_positions: int) -> str | None:
    """Why a query of ``query_tokens`` tokens does not fit a language model of ``max_positions``
    positions when the rest of its sequence (template, video tokens, answer) takes ``other_tokens``;
    None when it fits. Past its positions a model reads nonsense, often without an error."""
    room = max_positions - other_tokens
    if query_tokens <= room:
        return None
    if room <= 0:
        return (
            f"its language model has {max_positions:,} positions, and the prompt, the video and the "
            f"answer take {other_tokens:,} without a query: no query fits"
        )
    return (
        f"the query is {query_tokens:,} tokens long; this model takes at most {max(room, 0):,} (its "
        f"language model has {max_positions:,} positions, {other_tokens:,} of them for the prompt, "
        "the video and the answer)"
    )
