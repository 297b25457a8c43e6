"""Query normalisation and prompt rendering for grounding queries."""

from __future__ import annotations

from timerefine.answer_format.tokens import VIDEO

DEFAULT_TEMPLATE = f"{VIDEO}\nAt which time interval in the video can we see {{query}} occurring?"


def normalize_query(text: str) -> str:
    """VTimeLLM-style: lowercase, collapse whitespace, drop trailing periods."""
    return " ".join(text.lower().split()).rstrip(".").rstrip()


def render_prompt(template: str, query: str) -> str:
    """Fill ``{query}`` in ``template`` (which must also hold ``<video>``) with the normalised query."""
    for placeholder in ("{query}", VIDEO):
        if placeholder not in template:
            raise ValueError(f"prompt template lacks the {placeholder} placeholder: {template!r}")
    return template.replace("{query}", normalize_query(query))
