"""Weight-decay groups by name: on unsharded models they are the groups the shapes give (matrices decay,
vectors do not), for every part this project can train."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from grounding.answer_format.tokens import VIDEO
from lightning_modules.aux_head import AuxHead
from lightning_modules.language_model import LMSpec, LoraSpec, TinyLMSpec, build_language_model
from lightning_modules.param_groups import optimizer_groups, weight_decay_split
from lightning_modules.projector import FrameProjector
from lightning_modules.video_llm import VideoLLM
from tests import helpers


def every_part(arch: str, lora: LoraSpec | None) -> VideoLLM:
    """A Video LLM with all optional parts: temporal embedding, query conditioning, digit gate, aux and
    saliency heads."""
    tokenizer, hidden, tokens = helpers.tokenizer(), helpers.HIDDEN, helpers.SPEC.num_frames
    spec = TinyLMSpec(arch=arch, hidden_size=hidden, num_layers=1, num_heads=2, intermediate_size=64)
    return VideoLLM(
        build_language_model(tokenizer, LMSpec(tiny=spec), lora),
        FrameProjector("mlp", helpers.SPEC.feature_dim, hidden, tokens, True, 1, hidden),
        tokenizer.convert_tokens_to_ids(VIDEO),
        AuxHead(hidden, "mlp", "l1"),
        torch.zeros(tokens, 2, dtype=torch.long),
        nn.Linear(hidden, 1),
    )


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("lora", [None, LoraSpec(r=4, alpha=8, dropout=0.0)], ids=["full", "lora"])
def test_decay_split_by_name_matches_the_split_by_shape(arch: str, lora: LoraSpec | None) -> None:
    model = every_part(arch, lora)
    decay, no_decay = weight_decay_split(model)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert decay == [n for n, p in trainable if p.ndim >= 2]
    assert no_decay == [n for n, p in trainable if p.ndim < 2]
    for part in ("digit_gate", "projector.time.weight", "projector.film.weight", "aux_head.net.0.weight"):
        assert part in decay
    assert {"projector.film.bias", "saliency_head.bias"} <= set(no_decay)
    if lora is None:
        assert any(n.endswith("input_layernorm.weight") for n in no_decay)
        assert "lm.model.norm.weight" in no_decay and "lm.model.embed_tokens.weight" in decay
        assert any(n.endswith("q_proj.bias") for n in no_decay) == (arch == "qwen2")
    else:
        assert any("trainable_tokens_delta" in n for n in decay)
        assert any("lora_B" in n for n in decay)


def test_frozen_parameters_are_in_no_group() -> None:
    model = every_part("llama", LoraSpec(r=4, alpha=8, dropout=0.0))
    decay, no_decay = weight_decay_split(model)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and not frozen & (set(decay) | set(no_decay))


def test_projector_lr_puts_the_parts_outside_the_lm_in_groups_of_their_own() -> None:
    model = every_part("llama", LoraSpec(r=4, alpha=8, dropout=0.0))
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    same = optimizer_groups(model, 1e-3, 0.01, lm_prefix="lm.")
    assert [(g["lr"], g["weight_decay"]) for g in same] == [(1e-3, 0.01), (1e-3, 0.0)]
    groups = optimizer_groups(model, 1e-3, 0.01, projector_lr=3e-3, lm_prefix="lm.")
    seen = [trainable[id(p)] for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(trainable.values())  # every trainable parameter, once
    for group in groups:
        names = [trainable[id(p)] for p in group["params"]]
        assert all(n.startswith("lm.") == (group["lr"] == 1e-3) for n in names)
    outside = {trainable[id(p)] for g in groups if g["lr"] == 3e-3 for p in g["params"]}
    assert {"projector.film.weight", "aux_head.net.0.weight", "saliency_head.bias", "digit_gate"} <= outside
