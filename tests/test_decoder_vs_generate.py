"""The project's decoder (``generation.generate``) and Hugging Face ``generate()`` (with
``SlotLogitsProcessor`` when constrained) write the same tokens on a trained tiny model, for
K = 0..3, both answer spellings, a batch of left-padded prompts of different lengths."""

from __future__ import annotations

import json
from functools import partial

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

import evaluate
from datamodules.collate import GroundingCollator
from grounding.answer_format.codec import ANSWER_TOKENS, AnswerCodec
from grounding.answer_format.layout import parse_answer, spaced
from grounding.answer_format.prompts import DEFAULT_TEMPLATE, render_prompt
from grounding.answer_format.slots import Slot
from grounding.answer_format.targets import RefineSchedule
from lightning_modules.decoding import InferenceSpec
from lightning_modules.generation import Generation, generate
from lightning_modules.grounding_module import GroundingModule
from lightning_modules.hf_generation import hf_generate
from lightning_modules.optimization import OptimSpec
from lightning_modules.slot_logits_processor import SlotLogitsProcessor
from tests import helpers
from timerefine.pipeline.config import ConfigError, load_config

LAYOUTS = [(k, spelling) for k in range(4) for spelling in ANSWER_TOKENS]
TRAIN_STEPS = 120


def codec(k: int, spelling: str) -> AnswerCodec:
    return AnswerCodec(helpers.tokenizer(), RefineSchedule(steps=k), spelling)


def collator(k: int, spelling: str) -> GroundingCollator:
    return GroundingCollator(
        codec(k, spelling), partial(render_prompt, DEFAULT_TEMPLATE), helpers.SPEC.num_frames, 0
    )


@pytest.fixture(scope="module")
def model():
    """One tiny Video LLM (with an aux head) trained on the answers of every layout in turn: its free
    answers follow the format and end where they should, at different lengths."""
    module = GroundingModule(
        helpers.video_llm(refine_steps=3, seed=0), codec(3, "digits"), 1.0, OptimSpec(lr=1e-2, warmup_steps=10),
        InferenceSpec(),
    )  # fmt: skip
    data, collators = helpers.dataset(), [collator(*layout) for layout in LAYOUTS]
    batches = [collators[s % len(LAYOUTS)]([data[(s // 6, s % 6 * 8 + i)] for i in range(8)]) for s in range(TRAIN_STEPS)]  # fmt: skip
    trainer = L.Trainer(
        max_steps=TRAIN_STEPS,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return module.model.eval()


def eval_batch(k: int, spelling: str) -> dict:
    batch = collator(k, spelling)([helpers.dataset("test")[(0, i)] for i in range(8)])
    mask = batch["prompt_mask"].bool()
    assert len(set(mask.sum(1).tolist())) > 1 and mask[:, -1].all()  # ragged, left-padded prompts
    return batch


def both(
    model, batch: dict, budget: int, slots: list[Slot] | None, offset_id: int | None
) -> list[Generation]:
    args = (
        model,
        batch["prompt_ids"],
        batch["prompt_mask"],
        batch["features"],
        helpers.tokenizer().eos_token_id,
    )
    return [decode(*args, budget, slots=slots, offset_id=offset_id) for decode in (generate, hf_generate)]


def assert_same(fused: Generation, hf: Generation) -> None:
    assert fused.tokens == hf.tokens
    assert fused.has_offset.tolist() == hf.has_offset.tolist()
    if fused.offset_hidden is None:
        assert hf.offset_hidden is None
    else:  # the same hidden states, from passes of other shapes
        torch.testing.assert_close(fused.offset_hidden, hf.offset_hidden, rtol=1e-4, atol=1e-5)
        for ours, theirs in zip(fused.offset_states, hf.offset_states, strict=True):  # at every <OFFSET>
            assert (ours is None) == (theirs is None)
            if ours is not None:
                torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def offset_id(k: int) -> int | None:
    return helpers.tokenizer().convert_tokens_to_ids("<OFFSET>") if k else None


@pytest.mark.parametrize("k", range(4))
def test_free_greedy_decoding_matches_generate(model, k):
    budget = codec(k, "digits").answer_length() + 8
    fused, hf = both(model, eval_batch(k, "digits"), budget, None, offset_id(k))
    assert_same(fused, hf)
    if k:  # some answers end before the budget, at different lengths, some with an <OFFSET>
        assert len({len(t) for t in fused.tokens}) > 1 and min(map(len, fused.tokens)) < budget
        assert fused.has_offset.any()


def ending_at_once():
    """An untrained tiny Video LLM (K = 1, with an aux head) whose every answer ends at its first token."""
    model = helpers.video_llm(refine_steps=1, seed=0).eval()
    head = model.lm.lm_head
    ends_at_once = torch.nn.Linear(head.in_features, head.out_features)
    with torch.no_grad():
        ends_at_once.weight.copy_(head.weight)
        ends_at_once.bias.zero_()[helpers.tokenizer().eos_token_id] = 100.0
    model.lm.lm_head = ends_at_once
    return model


def test_answers_that_all_end_at_once_match_generate():
    """Before (review): with an aux head, ``generate()`` stopped after the prompt pass and the hidden
    states of no answer token could not be stacked: ``decoder=generate`` aborted the evaluation of an
    untrained or collapsed model instead of scoring its empty answers as unparsed."""
    fused, hf = both(ending_at_once(), eval_batch(1, "digits"), 20, None, offset_id(1))
    assert_same(fused, hf)
    assert hf.tokens == [[]] * 8 and not hf.has_offset.any()


def test_the_lms_own_generation_defaults_do_not_change_the_answers():
    """Before (review): ``generate()`` fills every option left unset from the LM's own
    ``generation_config`` (a checkpoint's generation_config.json): ``min_new_tokens=10`` there made
    ``decoder=generate`` write 10 tokens where the project's decoder ends at once."""
    model = ending_at_once()
    model.lm.generation_config.min_new_tokens = 10
    model.lm.generation_config.bad_words_ids = [[helpers.tokenizer().eos_token_id]]
    fused, hf = both(model, eval_batch(1, "digits"), 20, None, offset_id(1))
    assert_same(fused, hf)
    assert model.lm.generation_config.min_new_tokens == 10  # the LM's own, as it was


@pytest.mark.parametrize(("k", "spelling"), LAYOUTS)
def test_constrained_decoding_matches_generate_with_the_slot_processor(model, k, spelling):
    answers = codec(k, spelling)
    fused, hf = both(model, eval_batch(k, spelling), 0, answers.slots(), offset_id(k))
    assert_same(fused, hf)
    assert len({tuple(t) for t in fused.tokens}) > 1  # the rows chose differently
    texts = helpers.tokenizer().batch_decode(hf.tokens, skip_special_tokens=False)
    assert all(len(parse_answer(spaced(text))) == k + 1 for text in texts)
    if k:
        assert hf.has_offset.all()


def test_choices_of_different_lengths_match_generate(model):
    """Choices of one and two tokens: in a batch some rows wait (the project's decoder) while others
    write the choice's second token; ``generate()`` moves every row on by its own tokens."""
    tokenizer = helpers.tokenizer()
    digit = [tokenizer.convert_tokens_to_ids(d) for d in "0123456789"]
    choices = (*((d,) for d in digit[:5]), *((d, e) for d in digit[5:] for e in digit[:2]))
    slots = [
        Slot(choices=choices) if s.choices and len(s.choices) == 10 else s for s in codec(1, "digits").slots()
    ]
    fused, hf = both(model, eval_batch(1, "digits"), 0, slots, offset_id(1))
    assert_same(fused, hf)
    assert len({len(t) for t in fused.tokens}) > 1


def test_the_processor_allows_only_what_the_layout_allows_next():
    slots = [Slot(fixed=(1, 2)), Slot(choices=((3,), (4, 5), (4, 6))), Slot(fixed=(7,))]
    processor = SlotLogitsProcessor(slots, end_id=9)
    assert processor.max_new_tokens == 2 + 2 + 1 + 1

    def allowed(*answers: list[int]) -> list[set[int]]:
        scores = processor(
            torch.tensor(answers, dtype=torch.long).reshape(len(answers), -1), torch.zeros(len(answers), 10)
        )
        return [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in scores]  # fmt: skip

    assert allowed([], []) == [{1}, {1}]
    assert allowed([1], [1]) == [{2}, {2}]
    assert allowed([1, 2], [1, 2]) == [{3, 4}, {3, 4}]
    assert allowed([1, 2, 3], [1, 2, 4]) == [{7}, {5, 6}]
    assert allowed([1, 2, 3, 7], [1, 2, 4, 6]) == [{9}, {7}]
    assert allowed([1, 2, 3, 7, 9], [1, 2, 4, 6, 7]) == [{9}, {9}]
    assert allowed([1, 2, 3, 7, 9, 0], [1, 2, 4, 6, 7, 9]) == [{9}, {9}]  # padding after the end
    assert allowed([1, 2, 4], [1, 2, 3]) == [{5, 6}, {7}]  # shorter than before: a new call


def test_the_decoder_is_a_checked_config_value():
    assert load_config(["model.inference.decoder=generate"]).model.inference.decoder == "generate"
    with pytest.raises(ConfigError) as error:
        load_config(["model.inference.decoder=beam"])
    assert str(error.value).startswith("model.inference.decoder") and "\n" not in str(error.value)


@pytest.mark.slow
@pytest.mark.parametrize("constrained", [True, False])
def test_evaluate_gives_the_same_metrics_with_either_decoder(builtin_run, constrained):
    runs = {}
    for decoder in ("fused", "generate"):
        name = f"{decoder}_{constrained}"
        overrides = [f"model.inference.decoder={decoder}", f"model.inference.constrained={constrained}"]
        assert evaluate.main([str(builtin_run), "--name", name, *overrides]) == 0
        runs[decoder] = json.loads((builtin_run / "eval" / name / "metrics.json").read_text())
    # The answers are the same tokens, so every score of them is equal; the aux head regresses from
    # hidden states that the two decoders compute in other shapes (a cache vs whole passes), equal to
    # float rounding (1e-6 relative apart with torch held to AVX2).
    aux = {key for key in runs["fused"] if key.startswith(("test/aux", "test/mean"))}
    assert aux
    assert {k: v for k, v in runs["fused"].items() if k not in aux} == {
        k: v for k, v in runs["generate"].items() if k not in aux
    }
    assert {k: runs["fused"][k] for k in aux} == pytest.approx(
        {k: runs["generate"][k] for k in aux}, rel=1e-5
    )
    assert runs["fused"]["test/queries"] == 8
