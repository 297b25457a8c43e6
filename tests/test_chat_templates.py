"""Chat formats (``data.chat_template``) and named prompts (``data.prompt_template``): Qwen2's own
template and VTimeLLM's ``vicuna_v1`` with the Llama-2 tokenizer, the answer and its end token the
only labels, and the config checks of the new keys."""

from __future__ import annotations

from functools import partial

import pytest
from omegaconf import OmegaConf

import train
from datamodules.collate import GroundingCollator
from grounding.answer_format.chat import VICUNA_V1_SYSTEM, answer_end_id, chat_prompt, render_chat
from grounding.answer_format.codec import AnswerCodec
from grounding.answer_format.prompts import DEFAULT_TEMPLATE, REFERENCE_TEMPLATE, render_prompt
from grounding.answer_format.targets import RefineSchedule
from grounding.answer_format.tokens import IGNORE_INDEX, VIDEO
from tests import helpers, real_tokenizers
from timerefine.pipeline.build import build_datamodule
from timerefine.pipeline.config import ConfigError, load_config, load_run_config

needs_tokenizers = real_tokenizers.needs_tokenizers


def test_vicuna_v1_is_the_system_sentence_then_the_two_roles():
    prompt = render_prompt(REFERENCE_TEMPLATE, "A person sits down.")
    assert render_chat("vicuna_v1", prompt, None) == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. USER: <video>\n"
        "During which frames can we see a person sits down? ASSISTANT:"
    )
    assert render_chat("none", prompt, None) == prompt


def collated(name: str, chat_template: str, k: int = 3):
    tok = real_tokenizers.shared(name)
    codec = AnswerCodec(tok, RefineSchedule(steps=k), end_id=answer_end_id(chat_template, tok))
    collator = GroundingCollator(
        codec, partial(chat_prompt, DEFAULT_TEMPLATE, chat_template, tok), helpers.SPEC.num_frames
    )
    items = helpers.items(3)
    return tok, codec, collator, items, collator(items)


def check_only_the_answer_and_its_end_carry_loss(codec, collator, items, batch) -> None:
    for row, item in enumerate(items):
        prompt = collator.prompt_ids(item["record"].query)
        answer = codec.encode(collator.target_rounds(item["record"], item["epoch"], item["index"]))
        labels = batch["labels"][row]
        labelled = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
        assert labelled == list(range(len(prompt), len(prompt) + len(answer) + 1))
        assert labels[labelled].tolist() == [*answer, codec.end_id]
        assert batch["input_ids"][row, : len(prompt)].tolist() == prompt


@needs_tokenizers
def test_llama2_with_vicuna_v1():
    tok, codec, collator, items, batch = collated("llama2_spm", "vicuna_v1")
    assert codec.end_id == tok.eos_token_id == tok.convert_tokens_to_ids("</s>")
    query = items[0]["record"].query
    text = f"{VICUNA_V1_SYSTEM} USER: {render_prompt(DEFAULT_TEMPLATE, query)} ASSISTANT:"
    ids = tok.encode(text, add_special_tokens=False)
    at = ids.index(tok.convert_tokens_to_ids(VIDEO))
    frames = [ids[at]] * helpers.SPEC.num_frames
    assert collator.prompt_ids(query) == [tok.bos_token_id, *ids[:at], *frames, *ids[at + 1 :]]
    assert tok.decode(ids).endswith("occurring? ASSISTANT:")
    check_only_the_answer_and_its_end_carry_loss(codec, collator, items, batch)


@needs_tokenizers
def test_qwen2_with_its_own_chat_template():
    tok, codec, collator, items, batch = collated("qwen2", "tokenizer")
    assert codec.end_id == tok.convert_tokens_to_ids("<|im_end|>") != tok.eos_token_id
    query = items[0]["record"].query
    text = chat_prompt(DEFAULT_TEMPLATE, "tokenizer", tok, query)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert text.count(VIDEO) == 1 and render_prompt(DEFAULT_TEMPLATE, query) in text
    prompt = collator.prompt_ids(query)
    assert prompt[0] == tok.convert_tokens_to_ids("<|im_start|>")  # no BOS: Qwen2's is its EOS
    assert prompt.count(tok.convert_tokens_to_ids(VIDEO)) == helpers.SPEC.num_frames
    check_only_the_answer_and_its_end_carry_loss(codec, collator, items, batch)


@needs_tokenizers
def test_the_tokenizer_chat_template_needs_the_tokenizer_to_have_one(tmp_path, capsys):
    with pytest.raises(ValueError, match="has no chat template"):
        render_chat("tokenizer", "<video> {query}", real_tokenizers.shared("gpt2"))
    output = tmp_path / "run"
    argv = [
        "experiment=tiny",
        f"model.lm.tokenizer={real_tokenizers.path('gpt2')}",
        "data.chat_template=tokenizer",
        f"output_dir={output}",
    ]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.chat_template=tokenizer" in err[0] and "no chat template" in err[0]
    assert not output.exists()


def test_the_project_tokenizer_is_named_when_it_has_no_chat_template(tmp_path, capsys):
    """Before: 'the tokenizer () has no chat template'."""
    argv = ["experiment=tiny", "data.chat_template=tokenizer", f"output_dir={tmp_path / 'run'}"]
    assert train.main(argv) == 2
    assert "the tokenizer (a BPE trained on the data's text) has no chat template" in capsys.readouterr().err


def test_prompt_templates_are_named_choices():
    cfg = load_config(["data.prompt_template=reference"])
    assert build_datamodule(cfg).prompt_template == REFERENCE_TEMPLATE
    assert build_datamodule(load_config([])).prompt_template == DEFAULT_TEMPLATE
    custom = "Where in <video> is {query}?"
    assert build_datamodule(load_config([f"data.prompt_template='{custom}'"])).prompt_template == custom


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.prompt_template=vtimellm", "data.prompt_template=vtimellm: must be one of default, reference"),
        ("data.prompt_template='{query}?'", "or a template holding <video>"),
        ("data.chat_template=chatml", "data.chat_template=chatml: must be one of none, tokenizer, vicuna_v1"),
        ("model.answer_tokens=bpe", "model.answer_tokens=bpe: must be one of digits, canonical"),
        (
            "model.lm.tokenizer=./no/such/folder",
            "model.lm.tokenizer=./no/such/folder: ./no/such/folder is not a",
        ),
    ],
)
def test_bad_values_of_the_new_keys_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("?", r"\?")):
        load_config([override])


def test_a_folder_without_a_tokenizer_is_named(tmp_path):
    """Before: transformers' advice to install sentencepiece or tiktoken, for an empty folder."""
    (tmp_path / "config.json").write_text("{}")
    cfg = load_config([f"model.lm.tokenizer={tmp_path}"])
    with pytest.raises(ConfigError, match=f"^model.lm.tokenizer={tmp_path}: .*the folder holds no tokenizer"):
        build_datamodule(cfg)


def around_the_video(cfg, tokenizer_dir=None, query: str = "a person sits down.") -> tuple[str, str]:
    """The text of the token before and of the one after the video tokens of a run's prompt."""
    collator = build_datamodule(cfg, tokenizer_dir).collator
    ids, video = collator.prompt_ids(query), collator.codec.tokenizer.convert_tokens_to_ids(VIDEO)
    first, last = ids.index(video), len(ids) - 1 - ids[::-1].index(video)
    return tuple(collator.codec.tokenizer.decode(ids[i]) for i in (first - 1, last + 1))


@needs_tokenizers
def test_the_chat_template_newlines_around_the_video_are_kept(tmp_path):
    """Qwen2's template writes ``user\\n<video>\\nAt which``; before, the ``<video>`` token folded both
    newlines into itself and the LM read ``user<video>At which``. A run saved before
    ``model.lm.video_whitespace`` keeps the prompts it trained on, also from its saved tokenizer
    (Qwen2's forgets how its added tokens treat whitespace)."""
    tokenizer = [f"model.lm.tokenizer={real_tokenizers.path('qwen2')}", "data.chat_template=tokenizer"]
    cfg, saved_tokenizer = load_config(tokenizer), tmp_path / "tokenizer"
    assert around_the_video(cfg) == ("\n", "\n")
    assert around_the_video(load_config([*tokenizer, "model.lm.video_whitespace=folded"])) == ("user", "At")
    build_datamodule(cfg).codec.tokenizer.save_pretrained(saved_tokenizer)
    saved = OmegaConf.to_container(cfg)
    del saved["model"]["lm"]["video_whitespace"]
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    before_the_key = load_run_config(tmp_path, [])
    assert before_the_key.model.lm.video_whitespace == "folded"
    assert around_the_video(before_the_key, saved_tokenizer) == ("user", "At")
    assert around_the_video(cfg, saved_tokenizer) == ("\n", "\n")
