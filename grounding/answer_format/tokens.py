"""The answer format's fixed strings and label value, each defined once."""

from __future__ import annotations

VIDEO = "<video>"  # the prompt's placeholder for the video tokens
SEG_START, SEG_END, OFFSET, RETHINK = "<SEG_START>", "<SEG_END>", "<OFFSET>", "<RETHINK>"
MARKERS = (SEG_START, SEG_END, OFFSET, RETHINK)
GROUNDING_TOKENS = (*MARKERS, VIDEO)  # added to every tokenizer as special tokens, in this order
DIGITS, SIGNS = "0123456789", "+-"  # each a single token: timestamps are spelled character by character
IGNORE_INDEX = -100  # the label of tokens without LM loss (the default ``ignore_index`` of torch and HF)
