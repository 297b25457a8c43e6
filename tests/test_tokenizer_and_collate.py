"""The local tokenizer, the answer codec's token layout, and batch collation (masks, padding)."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grounding.answer_format.layout import format_answer, spaced
from grounding.answer_format.prompts import query_length_error
from grounding.answer_format.targets import RefineSchedule, make_target_rounds, sample_rng
from grounding.answer_format.tokens import DIGITS, GROUNDING_TOKENS, IGNORE_INDEX, SEG_START, SIGNS, VIDEO
from tests import helpers

SENTENCES = [
    "A person opens the door.",
    "Person takes a cup of coffee , then drinks from it .",
    "Un homme ouvre la fenêtre — puis s'assoit sur la chaise !",
    "Die Frau schließt die Tür; danach läuft sie weg...",
    "someone is holding a 📱 and laughing 😂😂",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n",
    "naïve café — ÆØÅ æøå 日本語のテキスト 한국어",
    'it\'s "quoted" (really) [brackets] {braces} 50% & <angle>',
    "numbers 0123456789 +-*/ 3.14 -2 +7",
]


def test_round_trip_of_annotation_like_sentences():
    tok = helpers.tokenizer()
    for sentence in SENTENCES:
        assert tok.decode(tok.encode(sentence, add_special_tokens=False)) == sentence


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=60))
def test_round_trip_of_arbitrary_unicode(text):
    tok = helpers.tokenizer()
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.unk_token_id is None or tok.unk_token_id not in ids
    assert tok.decode(ids) == text


def test_special_tokens_are_single_tokens():
    tok = helpers.tokenizer()
    for marker in GROUNDING_TOKENS:
        ids = tok.encode(marker, add_special_tokens=False)
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == marker
        # Also inside text, with no spaces around.
        assert tok.convert_tokens_to_ids(marker) in tok.encode(f"x{marker}y", add_special_tokens=False)
    ids = [tok.convert_tokens_to_ids(m) for m in GROUNDING_TOKENS]
    assert len(set(ids)) == len(ids)
    assert {tok.pad_token_id, tok.eos_token_id, tok.bos_token_id}.isdisjoint(ids)
    assert tok.eos_token_id != tok.pad_token_id


def test_digits_and_signs_are_single_tokens():
    tok = helpers.tokenizer()
    ids = [tok.convert_tokens_to_ids(c) for c in DIGITS + SIGNS]
    assert len(set(ids)) == len(ids) and None not in ids
    for char, token in zip(DIGITS + SIGNS, ids, strict=True):
        assert tok.decode([token]) == char
    # Digits are never merged: a number is spelled digit by digit.
    assert tok.tokenize("1234567890") == list("1234567890")


def some_steps(k: int, seed: int = 0):
    return make_target_rounds((17, 64), 40.0, RefineSchedule(steps=k), sample_rng(seed, 0, 3))


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_codec_encodes_text_runs_together_and_digits_alone(k):
    from itertools import groupby

    from grounding.answer_format.layout import answer_atoms, parse_answer

    tok = helpers.tokenizer()
    codec = helpers.codec(k)
    steps = some_steps(k)
    expected = []
    for is_text, group in groupby(answer_atoms(steps, with_offsets=k > 0), key=lambda a: a.kind == "text"):
        atoms = list(group)
        if is_text:
            expected += tok.encode("".join(a.text for a in atoms), add_special_tokens=False)
        else:
            expected += [tok.convert_tokens_to_ids(a.text) for a in atoms]
    assert codec.encode(steps) == expected
    # Spaces around markers fold into them; the text parses back to the same steps.
    assert parse_answer(tok.decode(codec.encode(steps))) == steps


@pytest.mark.parametrize("k", [0, 1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_filling_the_slots_reproduces_encode(k, seed):
    tok = helpers.tokenizer()
    codec = helpers.codec(k)
    steps = some_steps(k, seed)
    encoded = codec.encode(steps)
    text = format_answer(steps, with_offsets=k > 0)
    chosen = iter(c for c in text.split(SEG_START, 1)[1] if c in DIGITS + SIGNS)
    filled = []
    for slot in codec.slots():
        assert bool(slot.fixed) != bool(slot.choices)
        if slot.fixed:
            filled += slot.fixed
        else:
            token = tok.convert_tokens_to_ids(next(chosen))
            assert (token,) in slot.choices
            filled.append(token)
    assert next(chosen, None) is None
    assert filled == encoded
    assert codec.answer_length() == len(encoded)


@pytest.mark.parametrize("k", [0, 1, 3])
def test_slot_layout(k):
    codec = helpers.codec(k)
    slots = codec.slots()
    choice_slots = [s for s in slots if s.choices]
    digits = 4 * (k + 1) if k == 0 else 8 * (k + 1)
    signs = 0 if k == 0 else 2 * (k + 1)
    assert len(choice_slots) == digits + signs
    assert sum(len(s.choices) == 10 for s in choice_slots) == digits
    assert sum(len(s.choices) == 2 for s in choice_slots) == signs
    # Fixed runs are merged: never two fixed slots in a row.
    assert all(not (a.fixed and b.fixed) for a, b in itertools.pairwise(slots))


# ---- collation -----------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[0, 3])
def collated(request):
    k = request.param
    collator = helpers.collator(refine_steps=k)
    items = helpers.items(6)
    return k, collator, items, collator(items)


def test_batch_shapes(collated):
    _, _, items, batch = collated
    n, frames = len(items), helpers.SPEC.num_frames
    assert batch["features"].shape == (n, frames, helpers.SPEC.feature_dim)
    assert torch.equal(batch["features"][2], items[2]["features"])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["prompt_ids"].shape == batch["prompt_mask"].shape
    assert list(batch["records"]) == [item["record"] for item in items]
    # Queries differ in length, so there is padding to check.
    assert len(set(batch["prompt_mask"].sum(1).tolist())) > 1


def test_exactly_num_frames_placeholders(collated):
    _, _, _, batch = collated
    video = helpers.tokenizer().convert_tokens_to_ids(VIDEO)
    frames = helpers.SPEC.num_frames
    assert (batch["input_ids"] == video).sum(1).tolist() == [frames] * len(batch["records"])
    assert (batch["prompt_ids"] == video).sum(1).tolist() == [frames] * len(batch["records"])
    # The placeholders are contiguous (one run per sample).
    for row in batch["input_ids"]:
        where = (row == video).nonzero().flatten()
        assert where.tolist() == list(range(int(where[0]), int(where[0]) + frames))


def test_labels_cover_exactly_the_answer_and_eos(collated):
    k, collator, items, batch = collated
    tok = helpers.tokenizer()
    for row, item in enumerate(items):
        prompt = collator.prompt_ids(item["record"].query)
        answer = collator.codec.encode(collator.target_rounds(item["record"], item["epoch"], item["index"]))
        labels, ids, mask = batch["labels"][row], batch["input_ids"][row], batch["attention_mask"][row]
        labelled = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
        assert labelled == list(range(len(prompt), len(prompt) + len(answer) + 1))
        assert labels[labelled].tolist() == [*answer, tok.eos_token_id]
        assert torch.equal(labels[labelled], ids[labelled])
        assert ids[: len(prompt)].tolist() == prompt
        text = spaced(tok.decode(labels[labelled][:-1].tolist(), skip_special_tokens=False))
        assert text == format_answer(
            collator.target_rounds(item["record"], item["epoch"], item["index"]), with_offsets=k > 0
        )
        # Right padding: attention over the sequence, pad ids and IGNORE_INDEX labels after it.
        length = len(prompt) + len(answer) + 1
        assert mask[:length].all() and not mask[length:].any()
        assert (ids[length:] == tok.pad_token_id).all()
        assert (labels[length:] == IGNORE_INDEX).all()


def test_prompt_tokens_and_placeholders_never_carry_labels(collated):
    _, _, _, batch = collated
    video = helpers.tokenizer().convert_tokens_to_ids(VIDEO)
    assert (batch["labels"][batch["input_ids"] == video] == IGNORE_INDEX).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_prompts_are_left_padded(collated):
    _, collator, items, batch = collated
    tok = helpers.tokenizer()
    width = batch["prompt_ids"].shape[1]
    for row, item in enumerate(items):
        prompt = collator.prompt_ids(item["record"].query)
        pad = width - len(prompt)
        assert batch["prompt_ids"][row, pad:].tolist() == prompt
        assert (batch["prompt_ids"][row, :pad] == tok.pad_token_id).all()
        assert batch["prompt_mask"][row].tolist() == [0] * pad + [1] * len(prompt)
        if tok.bos_token_id is not None:
            assert prompt[0] == tok.bos_token_id
    assert batch["prompt_mask"][:, -1].all()  # every prompt ends at the last column


def test_gt_norm(collated):
    _, _, items, batch = collated
    expected = [
        [i["record"].start / i["record"].duration, i["record"].end / i["record"].duration] for i in items
    ]
    assert torch.allclose(batch["gt_norm"].double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6)
    assert ((batch["gt_norm"] >= 0) & (batch["gt_norm"] <= 1)).all()
    assert (batch["gt_norm"][:, 0] <= batch["gt_norm"][:, 1]).all()


def test_targets_change_with_the_epoch_but_not_the_prompt():
    collator = helpers.collator(refine_steps=3)
    epoch0, epoch1 = helpers.items(4, epoch=0), helpers.items(4, epoch=1)
    a, b = collator(epoch0), collator(epoch1)
    assert torch.equal(a["prompt_ids"], b["prompt_ids"])
    assert not torch.equal(a["labels"], b["labels"])
    assert torch.equal(collator(epoch0)["labels"], a["labels"])


def test_prompt_template_must_hold_one_video_placeholder():
    collator = helpers.collator(template="<video> and <video>: where is {query}?")
    with pytest.raises(ValueError, match="exactly once"):
        collator(helpers.items(1))
    with pytest.raises(ValueError, match="placeholder"):
        helpers.collator(template="no video here: {query}")(helpers.items(1))


@pytest.mark.parametrize("k", [0, 3])
def test_canonical_answers_with_the_local_tokenizer(k):
    """The local BPE keeps digits apart, so its canonical answers spell numbers digit by digit too."""
    from grounding.answer_format.codec import AnswerCodec
    from grounding.answer_format.layout import parse_answer

    tok = helpers.tokenizer()
    codec = AnswerCodec(tok, RefineSchedule(steps=k), "canonical")
    for seed in range(3):
        steps = some_steps(k, seed)
        ids = codec.encode(steps)
        assert ids == tok.encode(format_answer(steps, with_offsets=k > 0), add_special_tokens=False)
        assert parse_answer(spaced(tok.decode(ids))) == steps
    numbers = [slot for slot in codec.slots() if slot.choices]
    assert all(len({len(choice) for choice in slot.choices}) == 1 for slot in numbers)


def test_a_query_fits_the_positions_the_prompt_video_and_answer_leave():
    assert query_length_error(412, 100, 512) is None  # exactly the room left
    assert query_length_error(413, 100, 512) == (
        "the query is 413 tokens long; this model takes at most 412 (its language model has 512 "
        "positions, 100 of them for the prompt, the video and the answer)"
    )
    assert query_length_error(1, 600, 512) == (  # the rest alone is too long; before: "at most 0 (...)"
        "its language model has 512 positions, and the prompt, the video and the answer take 600 "
        "without a query: no query fits"
    )
