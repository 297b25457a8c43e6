"""Constrained decoding: one forward pass per choice, the same answers and aux state as without a cache."""

from __future__ import annotations

import pytest
import torch

from grounding.answer_format.tokens import OFFSET
from lightning_modules.generation import generate
from lightning_modules.hf_generation import hf_generate
from tests import helpers


def uncached_constrained(model, prompt: list[int], features: torch.Tensor, slots, offset_id: int):
    """Greedy over the choice slots, recomputing the whole sequence for every choice; and the last
    hidden state at the last <OFFSET> of the full answer (None without one)."""
    ids = list(prompt)
    with torch.no_grad():
        for slot in slots:
            if slot.fixed:
                ids += slot.fixed
                continue
            choices = [choice for (choice,) in slot.choices]  # digits and signs: one token each
            out = model.lm(inputs_embeds=model.embed(torch.tensor([ids]), features[None]), use_cache=False)
            ids.append(choices[int(out.logits[0, -1, choices].argmax())])
        out = model.lm(
            inputs_embeds=model.embed(torch.tensor([ids]), features[None]),
            use_cache=False,
            output_hidden_states=True,
        )
    offsets = [i for i, t in enumerate(ids) if t == offset_id]
    return ids[len(prompt) :], out.hidden_states[-1][0, offsets[-1]] if offsets else None


def test_free_decoding_never_chooses_the_video_placeholder():
    """Before: a model that preferred <video> answered with it, and GRPO's free rollouts
    (grpo.constrained=false) failed when their answers were embedded again ("each sample needs 4
    <video> placeholders")."""
    tok = helpers.tokenizer()
    model = helpers.video_llm(refine_steps=1, aux_loss=None).eval()
    video = model.video_token_id

    def prefer_video(module, inputs, logits):
        return logits.index_add(-1, torch.tensor([video]), torch.full((*logits.shape[:-1], 1), 1e4))

    model.lm.get_output_embeddings().register_forward_hook(prefer_video)
    batch = helpers.batch(refine_steps=1, n=2)
    args = (model, batch["prompt_ids"], batch["prompt_mask"], batch["features"], tok.eos_token_id, 6)
    ours, theirs = generate(*args), hf_generate(*args)
    assert ours.tokens == theirs.tokens and all(len(row) == 6 and video not in row for row in ours.tokens)


@pytest.mark.parametrize("k", [0, 1, 3])
def test_constrained_decoding_runs_one_pass_per_choice_and_matches_uncached(k):
    tok = helpers.tokenizer()
    model = helpers.video_llm(refine_steps=k, aux_loss="l1", seed=k).eval()
    batch = helpers.batch(refine_steps=k, n=3)
    assert len(set(batch["prompt_mask"].sum(1).tolist())) > 1  # left padding is exercised
    slots = helpers.codec(k).slots()
    offset_id = tok.convert_tokens_to_ids(OFFSET)
    passes = []
    model.lm.register_forward_pre_hook(lambda *_: passes.append(1))
    generation = generate(
        model, batch["prompt_ids"], batch["prompt_mask"], batch["features"], tok.eos_token_id, 0,
        slots=slots, offset_id=offset_id if k else None,
    )  # fmt: skip
    choices = sum(1 for slot in slots if slot.choices)
    # The prompt runs with the first fixed text; each choice's token with the fixed text after it;
    # the closing text holds no <OFFSET>, so it never runs.
    assert len(passes) == choices
    for row in range(3):
        prompt = batch["prompt_ids"][row][batch["prompt_mask"][row].bool()].tolist()
        tokens, offset_hidden = uncached_constrained(model, prompt, batch["features"][row], slots, offset_id)
        assert generation.tokens[row] == tokens
        if k:
            torch.testing.assert_close(generation.offset_hidden[row], offset_hidden, rtol=1e-4, atol=1e-5)
