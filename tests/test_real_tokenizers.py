"""The answer format with four real tokenizers (Llama-2 SPM, Llama-3 BPE, Qwen2, GPT-2), each spelling
numbers its own way, in both answer spellings (``digits``, ``canonical``): answers round-trip,
constrained decoding writes exactly the training ids, free decoding stops at the answer's end
token, BOS comes once, and the special tokens survive ``save_pretrained``."""

from __future__ import annotations

import itertools
from functools import partial

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from datamodules.collate import GroundingCollator
from grounding.answer_format.chat import chat_prompt, prompt_bos
from grounding.answer_format.codec import ANSWER_TOKENS, AnswerCodec
from grounding.answer_format.layout import format_answer, parse_answer, spaced
from grounding.answer_format.prompt_ids import special_texts, special_token_error, timestamp_length
from grounding.answer_format.prompts import DEFAULT_TEMPLATE
from grounding.answer_format.slots import Slot
from grounding.answer_format.targets import RefineRound, RefineSchedule, make_target_rounds, sample_rng
from grounding.answer_format.tokens import GROUNDING_TOKENS, IGNORE_INDEX, OFFSET, VIDEO
from lightning_modules.generation import generate
from lightning_modules.language_model import LMSpec, build_language_model
from lightning_modules.projector import FrameProjector
from lightning_modules.tokenizer import add_grounding_tokens
from lightning_modules.video_llm import VideoLLM
from tests import helpers, real_tokenizers

pytestmark = real_tokenizers.needs_tokenizers
NAMES = real_tokenizers.NAMES


def codec(name: str, k: int, answer_tokens: str) -> AnswerCodec:
    return AnswerCodec(real_tokenizers.shared(name), RefineSchedule(steps=k), answer_tokens)


def answers(k: int, count: int = 6) -> list[list[RefineRound]]:
    """Target rounds of depth ``k`` over varied segments, durations and noise draws."""
    schedule = RefineSchedule(steps=k)
    return [
        make_target_rounds((i * 13 % 60, 60 + i * 7 % 40), 20.0 + 9 * i, schedule, sample_rng(i, k, i))
        for i in range(count)
    ]


def spelled(slots: list[Slot], ids: list[int]) -> bool:
    """Whether walking ``slots`` can write exactly ``ids``: each fixed run in place, and for each
    choice slot exactly one choice that continues ``ids``."""
    at = 0
    for slot in slots:
        if slot.fixed:
            if tuple(ids[at : at + len(slot.fixed)]) != slot.fixed:
                return False
            at += len(slot.fixed)
            continue
        matching = [c for c in slot.choices if tuple(ids[at : at + len(c)]) == c]
        if len(matching) != 1:
            return False
        at += len(matching[0])
    return at == len(ids)


@pytest.mark.parametrize("answer_tokens", ANSWER_TOKENS)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_answers_encode_decode_and_parse_back(name, answer_tokens, k):
    tok, answer_codec = real_tokenizers.shared(name), codec(name, k, answer_tokens)
    for rounds in answers(k):
        ids = answer_codec.encode(rounds)
        if answer_tokens == "canonical":
            assert ids == tok.encode(format_answer(rounds, k > 0), add_special_tokens=False)
        text = spaced(tok.decode(ids, skip_special_tokens=False))
        assert parse_answer(text) == rounds
        assert spelled(answer_codec.slots(), ids)
        assert len(ids) <= answer_codec.answer_length()


@pytest.mark.parametrize("name", NAMES)
def test_canonical_answers_take_the_tokenizers_own_number_tokens(name):
    """The K=3 answer lengths the issue quotes: 67 tokens digit by digit, 47 (Llama-3) and 43 (GPT-2)
    canonical; the canonical choices of a number are its 100 spellings."""
    digits, canonical = codec(name, 3, "digits"), codec(name, 3, "canonical")
    assert digits.answer_length() == 67
    expected = {"llama2_spm": 63, "llama3_bpe": 47, "qwen2": 63, "gpt2": 43}[name]
    assert canonical.answer_length() == expected
    numbers = [s for s in canonical.slots() if s.choices]
    assert [len(s.choices) for s in numbers[:4]] == [100, 100, 200, 200]
    tok = real_tokenizers.shared(name)
    assert tok.decode(list(numbers[0].choices[36])) == "36"


@pytest.mark.parametrize("answer_tokens", ANSWER_TOKENS)
@pytest.mark.parametrize("name", NAMES)
def test_a_text_timestamp_is_what_an_answer_writes_for_its_number(name, answer_tokens):
    """``temporal_embedding=text`` writes each video token's index in the ids an answer's first
    number takes, so the LM can copy it; every real tokenizer writes 00-99 in one length."""
    answer_codec = codec(name, 3, answer_tokens)
    assert timestamp_length(answer_codec) in (1, 2)
    for value in (0, 7, 36, 99):
        stamp = answer_codec.number_ids(value)
        answer = answer_codec.encode([RefineRound(value, 99)] * 4)
        assert answer_codec.tokenizer.decode(stamp).strip() == f"{value:02d}"
        assert any(answer[i : i + len(stamp)] == stamp for i in range(len(answer)))


def tiny_video_llm(tok, seed: int = 0) -> VideoLLM:
    torch.manual_seed(seed)
    lm = build_language_model(tok, LMSpec(tiny=helpers.TINY), None)
    projector = FrameProjector("mlp", helpers.SPEC.feature_dim, helpers.HIDDEN)
    return VideoLLM(lm, projector, tok.convert_tokens_to_ids(VIDEO)).eval()


def collator(answer_codec: AnswerCodec, chat_template: str = "none") -> GroundingCollator:
    prompt = partial(chat_prompt, DEFAULT_TEMPLATE, chat_template, answer_codec.tokenizer)
    return GroundingCollator(answer_codec, prompt, helpers.SPEC.num_frames)


@pytest.mark.parametrize("answer_tokens", ANSWER_TOKENS)
@pytest.mark.parametrize("name", NAMES)
def test_constrained_decoding_writes_exactly_the_training_ids(name, answer_tokens):
    """Whatever a (random) model picks, the answer parses and its ids are the ones training uses."""
    k = 3
    tok, answer_codec = real_tokenizers.shared(name), codec(name, k, answer_tokens)
    batch = collator(answer_codec)(helpers.items(4))
    for seed in range(2):
        generation = generate(
            tiny_video_llm(tok, seed),
            batch["prompt_ids"],
            batch["prompt_mask"],
            batch["features"],
            answer_codec.end_id,
            0,
            slots=answer_codec.slots(),
            offset_id=tok.convert_tokens_to_ids(OFFSET),
        )
        assert generation.has_offset.all()
        for ids in generation.tokens:
            rounds = parse_answer(spaced(tok.decode(ids, skip_special_tokens=False)))
            assert len(rounds) == k + 1
            assert answer_codec.encode(rounds) == ids


def chain_lm(vocab: int, chain: list[int], hidden: int = 32) -> LlamaForCausalLM:
    """A real (Llama-shaped) LM whose greedy choice after ``chain[i]`` is ``chain[i + 1]``, whatever
    came before: attention and MLP outputs are zero, so each position's logits read its own
    embedding; the chain's embeddings are orthogonal and each is the output row of its successor."""
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    lm = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in lm.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                parameter.zero_()
        lm.get_output_embeddings().weight.zero_()
        basis = torch.eye(hidden)
        for i, (token, following) in enumerate(itertools.pairwise(chain)):
            lm.get_input_embeddings().weight[token] = basis[i]
            lm.get_output_embeddings().weight[following] = 10 * basis[i]
    return lm


@pytest.mark.parametrize("answer_tokens", ANSWER_TOKENS)
@pytest.mark.parametrize("name", NAMES)
def test_free_decoding_stops_at_the_end_token_which_labels_carry(name, answer_tokens):
    """Also where pad == EOS (Qwen2, GPT-2, and Llama-2 once given a pad): the end token is labelled,
    and free decoding of a model that writes the answer then EOS returns exactly the answer."""
    tok = real_tokenizers.shared(name)
    answer_codec = codec(name, 0, answer_tokens)
    rounds = [RefineRound(12, 34)]
    answer = answer_codec.encode(rounds)
    batch = collator(answer_codec)(helpers.items(3))
    for labels in batch["labels"]:
        labelled = labels[labels != IGNORE_INDEX].tolist()
        assert labelled[-1] == answer_codec.end_id == tok.eos_token_id
        assert labelled.count(tok.eos_token_id) == 1
    last_prompt_token = int(batch["prompt_ids"][0, -1])
    chain = [last_prompt_token, *answer, answer_codec.end_id]
    assert len(set(chain)) == len(chain)  # a chain model needs distinct tokens
    projector = FrameProjector("mlp", helpers.SPEC.feature_dim, 32)
    model = VideoLLM(chain_lm(len(tok), chain), projector, tok.convert_tokens_to_ids(VIDEO)).eval()
    assert (batch["prompt_ids"][:, -1] == last_prompt_token).all()
    generation = generate(
        model, batch["prompt_ids"], batch["prompt_mask"], batch["features"], answer_codec.end_id, 40
    )
    assert generation.tokens == [answer] * 3
    assert parse_answer(spaced(tok.decode(answer, skip_special_tokens=False))) == rounds


@pytest.mark.parametrize("name", NAMES)
def test_bos_is_added_once(name):
    """A tokenizer's BOS starts every prompt exactly once (none where BOS is EOS: GPT-2, Qwen2),
    also when a chat template writes it itself."""
    tok = real_tokenizers.load(name)
    bos = prompt_bos(tok)
    assert (bos is None) == (name in ("qwen2", "gpt2"))
    query = helpers.items(1)[0]["record"].query
    tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    for chat_template in ("none", "vicuna_v1", "tokenizer"):
        ids = collator(AnswerCodec(tok, RefineSchedule(steps=1)), chat_template).prompt_ids(query)
        if bos is not None:
            assert ids[0] == bos and ids.count(bos) == 1
        elif chat_template != "tokenizer":  # that template writes <|endoftext|> itself
            assert tok.bos_token_id not in ids
        assert ids.count(tok.convert_tokens_to_ids(VIDEO)) == helpers.SPEC.num_frames


@pytest.mark.parametrize("name", NAMES)
def test_special_tokens_survive_save_and_reload(name, tmp_path):
    tok = real_tokenizers.shared(name)
    tok.save_pretrained(tmp_path)
    again = add_grounding_tokens(AutoTokenizer.from_pretrained(tmp_path))
    assert len(again) == len(tok)
    assert again.convert_tokens_to_ids(list(GROUNDING_TOKENS)) == tok.convert_tokens_to_ids(
        list(GROUNDING_TOKENS)
    )
    for attribute in ("bos_token_id", "eos_token_id", "pad_token_id", "chat_template"):
        assert getattr(again, attribute) == getattr(tok, attribute)
    for k in (0, 3):
        schedule = RefineSchedule(steps=k)
        for answer_tokens in ANSWER_TOKENS:
            before, after = (
                AnswerCodec(tok, schedule, answer_tokens),
                AnswerCodec(again, schedule, answer_tokens),
            )
            assert after.slots() == before.slots()
            assert all(after.encode(r) == before.encode(r) for r in answers(k, 3))
    text = chat_prompt(DEFAULT_TEMPLATE, "vicuna_v1", tok, "a person sits down.")
    assert again.encode(text) == tok.encode(text)


@pytest.mark.parametrize(
    ("name", "special"),
    [
        ("llama2_spm", "</s>"),
        ("llama3_bpe", "<|eot_id|>"),
        ("qwen2", "<|im_end|>"),
        ("gpt2", "<|endoftext|>"),
    ],
)
def test_a_query_spelling_a_special_token_is_found(name, special):
    """Encoded with its prompt, a query's ``<|im_end|>`` is the token that ends the user's turn, not
    text; :func:`special_token_error` finds it (and nothing in an ordinary query) so that it can be refused."""
    tok = real_tokenizers.shared(name)
    query = f"a person says {special} twice"
    ids = collator(AnswerCodec(tok, RefineSchedule(steps=1))).prompt_ids(query)
    assert tok.convert_tokens_to_ids(special) in ids
    specials = special_texts(tok)
    assert f"the query holds {special!r}" in special_token_error(specials, query)
    assert special_token_error(specials, "a person says <eos> or </end> twice") is None
