"""GRPO's policy without dropout (``grpo.disable_dropout``): sampling, scoring and the KL reference see
one model, in every form Hugging Face LMs keep their dropout."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from lightning_modules.grpo_module import without_dropout
from lightning_modules.language_model import LoraSpec
from tests import helpers
from tests.test_grpo import grpo_module


@pytest.mark.parametrize("disable_dropout", [True, False])
def test_without_dropout_the_first_ratio_is_1_and_the_kl_starts_at_0(disable_dropout):
    """Before (review): LoRA's dropout stayed on while sampling and scoring, off in the reference."""
    module = grpo_module(LoraSpec(dropout=0.5), G=2, num_iterations=2, disable_dropout=disable_dropout)
    for name, weight in module.model.named_parameters():
        if "lora_B" in name:  # a trained LoRA (initialised, its B is 0: its dropout changes nothing)
            weight.data.normal_()
    module.keep_reference()
    rollout = module.train().rollout(helpers.batch(n=2))
    logp = module.token_logps(module.model, rollout)[0]
    assert torch.equal(logp, rollout.old_logp) == torch.equal(logp, rollout.ref_logp) == disable_dropout


SIZES = {"vocab_size": 64, "hidden_size": 32, "num_attention_heads": 2}
LMS = {
    "gpt2 (nn.Dropout layers)": GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2)),
    "llama (a rate, attention_dropout)": LlamaForCausalLM(
        LlamaConfig(**SIZES, intermediate_size=64, num_hidden_layers=1, attention_dropout=0.5)
    ),
    "opt (rates, dropout)": OPTForCausalLM(
        OPTConfig(**SIZES, ffn_dim=64, num_hidden_layers=1, word_embed_proj_dim=32, dropout=0.5)
    ),
}


@pytest.mark.parametrize("name", LMS)
def test_every_kind_of_dropout_is_turned_off(name):
    """Review: a rate kept as ``dropout`` (OPT) stayed on."""
    lm = LMS[name].train()
    ids = torch.randint(0, 64, (2, 12))
    torch.manual_seed(0)
    assert not torch.equal(lm(ids).logits, lm(ids).logits)  # the case has dropout to turn off
    without_dropout(lm)
    assert torch.equal(lm(ids).logits, lm(ids).logits)
