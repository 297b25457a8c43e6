"""The policy GRPO scores is the one it samples from: constrained, the LM renormalised over the tokens
the layout allows; free, the LM without the ``<video>`` placeholder, which no answer may hold."""

from __future__ import annotations

import pytest
import torch

from grounding.answer_format.tokens import IGNORE_INDEX
from tests import helpers
from tests.test_grpo import grpo_module


def _logits(module, rollout) -> torch.Tensor:
    """The LM's logits over the rollout, from a plain forward pass."""
    with torch.no_grad():
        embeds = module.model.embed(rollout.input_ids, rollout.features, rollout.labels == IGNORE_INDEX)
        return module.model.lm(inputs_embeds=embeds, attention_mask=rollout.attention_mask).logits.float()


def test_the_policy_is_the_model_renormalised_over_the_allowed_tokens():
    """The log-probability of each sampled digit or sign: the LM's logits at that place, softmax over
    the tokens the layout allows there (recomputed from a plain forward pass); fixed text does not count."""
    module = grpo_module(G=2, temperature=0.7)
    batch = helpers.batch(n=1)
    rollout = module.rollout(batch)
    logp, _ = module.token_logps(module.model, rollout)
    logits = _logits(module, rollout)
    digits = [module.codec.char_ids[c] for c in "0123456789"]
    signs = [module.codec.char_ids[c] for c in "+-"]
    checked = 0
    for row, place in rollout.mask.nonzero().tolist():
        token = int(rollout.input_ids[row, place + 1])
        options = digits if token in digits else signs
        expected = torch.log_softmax(logits[row, place, options] / 0.7, -1)[options.index(token)]
        assert float(logp[row, place]) == pytest.approx(float(expected), abs=1e-4)
        checked += 1
    answer_tokens = int((rollout.labels != IGNORE_INDEX).sum())
    assert 0 < checked < answer_tokens  # the digits and signs count, the fixed text does not


def test_free_answers_are_scored_without_the_placeholder_they_cannot_hold():
    """Free decoding never samples ``<video>``: the log-probability of each answer token is the softmax
    over the vocabulary without it. Before (review): scored over the whole vocabulary, the policy
    whose ratio and KL are taken was not the one sampled (here the placeholder is made likely)."""
    module = grpo_module(G=2, temperature=0.7, constrained=False)
    placeholder = module.model.video_token_id
    likeliest = int(_logits(module, module.rollout(helpers.batch(n=1))).mean((0, 1)).argmax())
    with torch.no_grad():  # the placeholder's output row: the likeliest token's
        out = module.model.lm.get_output_embeddings().weight
        out[placeholder] = out[likeliest]
    rollout = module.rollout(helpers.batch(n=1))
    logp, _ = module.token_logps(module.model, rollout)
    logits = _logits(module, rollout) / 0.7
    logits[..., placeholder] = -torch.inf
    expected = torch.log_softmax(logits, -1)[:, :-1].gather(2, rollout.input_ids[:, 1:, None]).squeeze(2)
    assert rollout.mask.any()
    assert logp[rollout.mask].tolist() == pytest.approx(expected[rollout.mask].tolist(), abs=1e-4)
