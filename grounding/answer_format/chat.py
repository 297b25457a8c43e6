"""Chat formats (``data.chat_template``): a rendered prompt as a chat model's user turn, the BOS a
prompt starts with, and the token that ends an answer.

- ``none``: the prompt as it is, answers end with EOS.
- ``tokenizer``: the tokenizer's own chat template (``apply_chat_template`` with the generation
  prompt); answers end with the token the template closes an assistant turn with (Qwen2's
  ``<|im_end|>``), else EOS.
- a named template for models that ship none, e.g. ``vicuna_v1`` (Vicuna v1.1, as VTimeLLM uses it):
  ``{system} USER: {prompt} ASSISTANT:``, answers end with EOS (``</s>``).

Only the answer and its end token carry loss (the collator masks everything before).
"""

from __future__ import annotations

from collections.abc import Callable

from transformers import PreTrainedTokenizerBase

from grounding.answer_format.prompts import render_prompt

VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def vicuna_v1(prompt: str) -> str:
    return f"{VICUNA_V1_SYSTEM} USER: {prompt} ASSISTANT:"


NAMED_TEMPLATES: dict[str, Callable[[str], str]] = {"vicuna_v1": vicuna_v1}
CHAT_TEMPLATES = ("none", "tokenizer", *NAMED_TEMPLATES)
_ANSWER = "\x00answer\x00"  # stands for the assistant's message while finding what follows it


def _check(chat_template: str, tokenizer: PreTrainedTokenizerBase) -> None:
    if chat_template not in CHAT_TEMPLATES:
        raise ValueError(f"unknown chat template {chat_template!r}; choose from {', '.join(CHAT_TEMPLATES)}")
    if chat_template == "tokenizer" and tokenizer.chat_template is None:
        name = tokenizer.name_or_path or "a BPE trained on the data's text"
        raise ValueError(f"the tokenizer ({name}) has no chat template")


def render_chat(chat_template: str, prompt: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """``prompt`` as the user turn of ``chat_template``, up to where the assistant's answer starts."""
    _check(chat_template, tokenizer)
    if chat_template == "none":
        return prompt
    if chat_template == "tokenizer":
        user = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    return NAMED_TEMPLATES[chat_template](prompt)


def answer_end_id(chat_template: str, tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that ends every answer: EOS, or the special token the tokenizer's chat template
    writes right after an assistant message."""
    _check(chat_template, tokenizer)
    if chat_template != "tokenizer":
        return tokenizer.eos_token_id
    turns = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _ANSWER}]
    after = tokenizer.apply_chat_template(turns, tokenize=False).split(_ANSWER, 1)[-1].lstrip()
    ids = tokenizer.encode(after, add_special_tokens=False)[:1]
    special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return ids[0] if ids and ids[0] in special else tokenizer.eos_token_id


def prompt_bos(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The BOS a prompt starts with: the tokenizer's, unless it is also its EOS (GPT-2's and Qwen2's
    ``<|endoftext|>`` separates documents; neither model starts a prompt with it)."""
    bos = tokenizer.bos_token_id
    return None if bos is None or bos == tokenizer.eos_token_id else bos


def chat_prompt(template: str, chat_template: str, tokenizer: PreTrainedTokenizerBase, query: str) -> str:
    """The prompt text for ``query``: ``template`` filled in, in ``chat_template``'s user turn."""
    return render_chat(chat_template, render_prompt(template, query), tokenizer)
