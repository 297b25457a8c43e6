"""``model.lm.grounding_tokens=reference`` (set by ``experiment=reference_recipe``): the official
token ids, order and spelling. The official sequence is built here from the official code's rules
(as read, not copied): the four markers added with ``add_tokens(..., special_tokens=True)`` (spaces
around them kept), the Vicuna v1.1 conversation ``{system} USER: <video>\\n{question} ASSISTANT:
{answer}</s>``, each side of ``<video>`` tokenized on its own with its BOS dropped after the first,
LLaVA's image index in between, and labels from the end of ``ASSISTANT: `` to the ``</s>``."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from grounding.answer_format.prompt_ids import encode_prompt
from grounding.answer_format.targets import RefineRound
from grounding.answer_format.tokens import IGNORE_INDEX, VIDEO, VIDEO_INDEX
from lightning_modules.tokenizer import add_grounding_tokens
from tests import real_tokenizers
from timerefine.pipeline.build import build_datamodule, build_module
from timerefine.pipeline.config import load_config

pytestmark = real_tokenizers.needs_tokenizers

OFFICIAL_MARKERS = ["<SEG_START>", "<SEG_END>", "<RETHINK>", "<OFFSET>"]
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
QUESTION = "During which frames can we see {}?"
TINY = [
    "model.lm.tiny.hidden_size=32",
    "model.lm.tiny.num_layers=1",
    "model.lm.tiny.num_heads=2",
    "model.lm.tiny.intermediate_size=64",
    "data.source.num_train=8",
    "data.source.num_val=4",
    "data.source.num_test=4",
]


def official_tokenizer():
    tok = AutoTokenizer.from_pretrained(real_tokenizers.path("llama2_spm"))
    tok.add_tokens(OFFICIAL_MARKERS, special_tokens=True)
    return tok


def official_answer(rounds: list[RefineRound], with_offsets: bool) -> str:
    """The text the official data conversion writes: two-digit indices, signed two-digit offsets."""

    def signed(value: int, zero_sign: str) -> str:
        sign = "+" if value > 0 else "-" if value < 0 else zero_sign
        return f"{sign}{abs(value):02d}"

    parts = []
    for r in rounds:
        part = f"{r.start:02d} to {r.end:02d}"
        if with_offsets:
            part += f" <OFFSET> {signed(r.offset_start, r.zero_signs[0])} and {signed(r.offset_end, r.zero_signs[1])}"
        parts.append(part)
    return "From <SEG_START> " + " <RETHINK> ".join(parts) + " <SEG_END>."


def image_tokens(tok, text: str) -> list[int]:
    """LLaVA's rule: each side of <video> tokenized with its BOS, kept on the first side only."""
    chunks = [tok(chunk).input_ids for chunk in text.split("<video>")]
    ids = chunks[0]
    for chunk in chunks[1:]:
        ids += [VIDEO_INDEX, *chunk[1:]]
    return ids


def official_query(sentence: str) -> str:
    """The official evaluation's query: stripped, lower case, one final period dropped."""
    sentence = sentence.strip().lower()
    return sentence[:-1] if sentence.endswith(".") else sentence


def official_training_sample(tok, query: str, answer: str) -> tuple[list[int], list[int]]:
    """Input ids and labels of one grounding turn, masked as the official preprocessing masks them."""
    rou = f"{SYSTEM} USER: <video>\n{QUESTION.format(official_query(query))} ASSISTANT: {answer}"
    ids = image_tokens(tok, rou + "</s>")
    sep = " ASSISTANT: "
    instruction_len = len(image_tokens(tok, rou.split(sep)[0] + sep)) - 2
    round_len = len(image_tokens(tok, rou))
    assert 1 + round_len == len(ids)  # else the official code masks the whole sample
    labels = [IGNORE_INDEX] * len(ids)
    labels[1 + instruction_len : 1 + round_len] = ids[1 + instruction_len : 1 + round_len]
    return ids, labels


def official_prompt(tok, query: str) -> list[int]:
    return image_tokens(tok, f"{SYSTEM} USER: <video>\n{QUESTION.format(official_query(query))} ASSISTANT:")


def collapsed(ids: list[int], placeholder: int) -> list[int]:
    """A run of video placeholders as one."""
    return [t for i, t in enumerate(ids) if t != placeholder or i == 0 or ids[i - 1] != placeholder]


@pytest.mark.parametrize("steps", [0, 3])
def test_prompt_and_answer_ids_equal_the_official_construction(steps):
    cfg = load_config(
        [
            "experiment=reference_recipe",
            f"model.lm.tokenizer={real_tokenizers.path('llama2_spm')}",
            f"model.refine.steps={steps}",
            *TINY,
        ]
    )
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    module = build_module(cfg, datamodule)
    tok = module.tokenizer
    assert tok.convert_tokens_to_ids(OFFICIAL_MARKERS) == [32000, 32001, 32002, 32003] and len(tok) == 32004
    assert VIDEO not in tok.get_added_vocab() and module.model.video_token_id == VIDEO_INDEX
    official = official_tokenizer()
    collator, dataset = datamodule.collator, datamodule.datasets["train"]
    items = [dataset[(0, i)] for i in range(3)]
    batch = collator(items)
    for row, item in enumerate(items):
        record = item["record"]
        rounds = collator.target_rounds(record, 0, item["index"])
        ids, labels = official_training_sample(official, record.query, official_answer(rounds, steps > 0))
        length = int(batch["attention_mask"][row].sum())
        fed = batch["input_ids"][row, :length].tolist()
        assert fed.count(VIDEO_INDEX) == cfg.data.source.num_frames
        assert collapsed(fed, VIDEO_INDEX) == ids
        fed_labels, shift = batch["labels"][row, :length].tolist(), cfg.data.source.num_frames - 1
        assert {i - shift: t for i, t in enumerate(fed_labels) if t != IGNORE_INDEX} == {
            i: t for i, t in enumerate(labels) if t != IGNORE_INDEX
        }
        prompt = batch["prompt_ids"][row][batch["prompt_mask"][row].bool()].tolist()
        assert collapsed(prompt, VIDEO_INDEX) == official_prompt(official, record.query)
    spelled = official.convert_ids_to_tokens([t for t in labels if t != IGNORE_INDEX][:8])
    assert spelled[:5] == ["▁From", "▁", "<SEG_START>", "▁", spelled[4]] and spelled[6] == "▁to"


def test_video_keeps_the_newlines_around_it_in_qwens_chat_turn():
    tok = add_grounding_tokens(AutoTokenizer.from_pretrained(real_tokenizers.path("qwen2")), "reference")
    text = tok.apply_chat_template(
        [{"role": "user", "content": "<video>\nDuring which frames can we see x?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = encode_prompt(tok, text)
    at = ids.index(VIDEO_INDEX)
    assert tok.decode(ids[:at]).endswith("<|im_start|>user\n")
    assert tok.decode(ids[at + 1 :]).startswith("\nDuring which frames")


@pytest.mark.parametrize("name", ["llama2_spm", "qwen2"])
def test_a_saved_tokenizer_keeps_its_style(name, tmp_path):
    """Reloaded as runs reload it (the style read from the tokenizer): the same ids, the same spelling
    (a saved Qwen2 tokenizer forgets that its added tokens keep the spaces around them)."""
    tok = add_grounding_tokens(AutoTokenizer.from_pretrained(real_tokenizers.path(name)), "reference")
    tok.save_pretrained(tmp_path)
    again = add_grounding_tokens(AutoTokenizer.from_pretrained(tmp_path))
    assert again.get_added_vocab() == tok.get_added_vocab() and VIDEO not in tok.get_added_vocab()
    text = "From <SEG_START> 12 to 34 <OFFSET> +05 and -03 <SEG_END>."
    assert again.encode(text) == tok.encode(text)
    if name == "llama2_spm":
        assert tok.encode(text) == official_tokenizer().encode(text)
