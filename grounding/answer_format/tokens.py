"""The answer format's fixed strings and label value, each defined once."""

from __future__ import annotations

VIDEO = "<video>"  # the prompt's placeholder for the video tokens
SEG_START, SEG_END, OFFSET, RETHINK = "<SEG_START>", "<SEG_END>", "<OFFSET>", "<RETHINK>"
MARKERS = (SEG_START, SEG_END, OFFSET, RETHINK)
GROUNDING_TOKENS = (*MARKERS, VIDEO)  # added to every tokenizer as special tokens, in this order
# ``model.lm.grounding_tokens``: ``project`` adds GROUNDING_TOKENS, the markers absorbing the spaces
# around them; ``reference`` adds the official code's four markers in its order (Vicuna ids
# 32000-32003), spaces kept, and ``<video>`` is no token: a prompt holds VIDEO_INDEX (LLaVA's image
# index) in its place.
REFERENCE_MARKERS = (SEG_START, SEG_END, RETHINK, OFFSET)
TOKEN_STYLES = {"project": GROUNDING_TOKENS, "reference": REFERENCE_MARKERS}
# ``model.lm.video_whitespace`` (``project``): the whitespace a prompt writes around ``<video>`` (the
# newline after it in every named template, a chat template's before it) ``kept`` as text, or
# ``folded`` into the token as a marker folds its spaces (every run saved before the key: its LM read
# ``user<video>At which`` for ``user\n<video>\nAt which``).
VIDEO_WHITESPACE = ("kept", "folded")
VIDEO_INDEX = -200
DIGITS, SIGNS = "0123456789", "+-"  # each a single token: timestamps are spelled character by character
IGNORE_INDEX = -100  # the label of tokens without LM loss (the default ``ignore_index`` of torch and HF)
