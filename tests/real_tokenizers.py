"""The real tokenizer folders of ``../shared/data/tokenizers`` (vocabulary only), for the tests that
use them; those tests skip when the folder is absent."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lightning_modules.tokenizer import add_grounding_tokens

FOLDER = Path(__file__).resolve().parents[2] / "shared" / "data" / "tokenizers"
NAMES = ("llama2_spm", "llama3_bpe", "qwen2", "gpt2")
needs_tokenizers = pytest.mark.skipif(not FOLDER.is_dir(), reason=f"no real tokenizers at {FOLDER}")


def path(name: str) -> Path:
    return FOLDER / name


def load(name: str) -> PreTrainedTokenizerBase:
    """A fresh copy, with the grounding tokens added (as the runs add them)."""
    return add_grounding_tokens(AutoTokenizer.from_pretrained(path(name)))


@cache
def shared(name: str) -> PreTrainedTokenizerBase:
    """One copy per session; tests must not modify it."""
    return load(name)
