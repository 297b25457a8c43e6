"""LoRA on the tiny LM: the base freezes, adapters and the grounding tokens' rows train."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from grounding.answer_format.tokens import MARKERS
from grounding.checks import SpecError
from lightning_modules.language_model import (
    LoraSpec,
    LoraTargetError,
    grounding_token_ids,
    linear_layer_names,
)
from tests import helpers


def test_lora_freezes_the_base_and_trains_adapters_and_grounding_rows():
    tok = helpers.tokenizer()
    module = helpers.module(refine_steps=1, aux_loss="l1", lora=LoraSpec(r=4, alpha=8, dropout=0.0))
    lm = module.model.lm
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    frozen = {n for n, p in lm.named_parameters() if not p.requires_grad}
    assert trainable and all("lora_" in n or "trainable_tokens" in n for n in trainable)
    assert any("lora_A" in n for n in trainable) and any("lora_B" in n for n in trainable)
    assert any("trainable_tokens" in n for n in trainable)
    assert any("q_proj.base_layer" in n for n in frozen) and any("lm_head" in n for n in frozen)
    assert any("mlp" in n for n in frozen)
    # Projector and aux head are outside the LM and train fully.
    assert all(p.requires_grad for p in module.model.projector.parameters())
    assert all(p.requires_grad for p in module.model.aux_head.parameters())

    vocabulary = torch.arange(len(tok))
    with torch.no_grad():
        before = lm.get_input_embeddings()(vocabulary).clone()
    frozen_before = {n: p.detach().clone() for n, p in lm.named_parameters() if not p.requires_grad}

    module.train()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        module._losses(helpers.batch(refine_steps=1, n=3))["loss"].backward()
        optimizer.step()

    with torch.no_grad():
        after = lm.get_input_embeddings()(vocabulary)
    changed = set((after != before).any(dim=1).nonzero().flatten().tolist())
    grounding = set(grounding_token_ids(tok))
    assert changed and changed <= grounding
    # The answer markers are in every target, so their rows must have moved.
    assert {tok.convert_tokens_to_ids(t) for t in MARKERS} <= changed
    for name, p in lm.named_parameters():
        if name in frozen_before:
            assert torch.equal(p, frozen_before[name]), name


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (["q_proj", "nonexistent"], "no layer of LlamaForCausalLM is named nonexistent (its linear layers"),
        (["dense"], "no layer of LlamaForCausalLM is named dense"),
        (["lm_head"], "lm_head is an embedding or output layer, whose grounding-token rows train already"),
        (["embed_tokens"], "embed_tokens is an embedding or output layer"),
        (
            ["q_proj", "self_attn"],
            "self_attn (LlamaAttention) is a block LoRA cannot adapt (its linear layers",
        ),
        (["mlp"], "mlp (LlamaMLP) is a block LoRA cannot adapt"),
    ],
)
def test_lora_targets_the_lm_lacks_or_cannot_adapt_are_named(targets, message):
    """Before (review): a name that matched nothing was dropped when another matched (q_proj alone
    trained); with none matching, or the output layer named, peft raised a traceback."""
    with pytest.raises(LoraTargetError, match=re.escape(message)):
        helpers.module(refine_steps=1, lora=LoraSpec(target_modules=targets))


def test_all_linear_stands_alone():
    """Before (review): [all-linear, q_proj] trained q_proj only."""
    with pytest.raises(SpecError, match="all-linear stands alone"):
        LoraSpec(target_modules=["all-linear", "q_proj"])


def test_gpt2_projections_count_as_linear_layers():
    """GPT-2's projections are transformers' Conv1D, which LoRA adapts: the names a refused target's
    message lists (it listed none for GPT-2: review)."""
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    assert linear_layer_names(model) == {"c_attn", "c_proj", "c_fc"}
