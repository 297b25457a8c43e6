"""Shared builders for the core tests: tiny data, the local tokenizer, tiny models. Plain functions.

Everything is CPU-sized (a 1-layer, 32-wide LM; 8 frames of 16-d features) and deterministic.
"""

from __future__ import annotations

from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from datamodules.builtin import BuiltinFeatureStore, BuiltinSpec, builtin_records
from datamodules.collate import GroundingCollator
from datamodules.dataset import GroundingDataset
from grounding.answer_format.codec import AnswerCodec
from grounding.answer_format.layout import format_answer
from grounding.answer_format.prompts import DEFAULT_TEMPLATE, render_prompt
from grounding.answer_format.targets import RefineSchedule, make_target_rounds, sample_rng
from grounding.answer_format.tokens import VIDEO
from lightning_modules.aux_head import AuxHead
from lightning_modules.decoding import InferenceSpec
from lightning_modules.grounding_module import GroundingModule
from lightning_modules.language_model import LMSpec, LoraSpec, TinyLMSpec, build_language_model
from lightning_modules.optimization import OptimSpec
from lightning_modules.projector import FrameProjector
from lightning_modules.tokenizer import build_tokenizer, train_local_tokenizer
from lightning_modules.video_llm import VideoLLM

SPEC = BuiltinSpec(num_train=48, num_val=8, num_test=8, num_frames=8, feature_dim=16, seed=0)
TINY = TinyLMSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
HIDDEN = TINY.hidden_size


def corpus(spec: BuiltinSpec = SPEC) -> list[str]:
    """Prompts of the train split plus sample answers of every K = 0..3."""
    texts = [render_prompt(DEFAULT_TEMPLATE, r.query) for r in builtin_records(spec, "train")]
    for k in range(4):
        schedule = RefineSchedule(steps=k)
        for i in range(20):
            rounds = make_target_rounds((i, 40 + i), 30.0, schedule, sample_rng(0, k, i))
            texts.append(format_answer(rounds, schedule.with_offsets))
    return texts


@lru_cache(maxsize=1)
def tokenizer():
    """The local byte-level BPE (built once per session; tests must not modify it)."""
    return build_tokenizer(None, corpus(), 300)


def dataset(split: str = "train", spec: BuiltinSpec = SPEC) -> GroundingDataset:
    return GroundingDataset(builtin_records(spec, split), BuiltinFeatureStore(spec, split))


def items(n: int = 4, split: str = "train", epoch: int = 0, start: int = 0) -> list[dict[str, Any]]:
    data = dataset(split)
    return [data[(epoch, i)] for i in range(start, start + n)]


def codec(refine_steps: int = 3) -> AnswerCodec:
    return AnswerCodec(tokenizer(), RefineSchedule(steps=refine_steps))


def collator(refine_steps: int = 3, seed: int = 0, template: str = DEFAULT_TEMPLATE) -> GroundingCollator:
    return GroundingCollator(
        codec(refine_steps),
        partial(render_prompt, template),
        SPEC.num_frames,
        seed,
    )


def batch(refine_steps: int = 3, n: int = 4, split: str = "train", start: int = 0) -> dict[str, Any]:
    return collator(refine_steps)(items(n, split, start=start))


def video_llm(
    refine_steps: int = 3,
    aux_loss: str | None = "l1",
    lora: LoraSpec | None = None,
    projector: str = "mlp",
    seed: int = 0,
) -> VideoLLM:
    torch.manual_seed(seed)
    tok = tokenizer()
    lm = build_language_model(tok, LMSpec(tiny=TINY), lora)
    aux = AuxHead(HIDDEN, "mlp", aux_loss) if aux_loss is not None and refine_steps > 0 else None
    return VideoLLM(
        lm, FrameProjector(projector, SPEC.feature_dim, HIDDEN), tok.convert_tokens_to_ids(VIDEO), aux
    )


def module(
    refine_steps: int = 3,
    aux_loss: str | None = "l1",
    aux_weight: float = 1.0,
    lora: LoraSpec | None = None,
    seed: int = 0,
    **inference: Any,
) -> GroundingModule:
    model = video_llm(refine_steps, aux_loss if aux_weight > 0 else None, lora, seed=seed)
    return GroundingModule(
        model,
        codec(refine_steps),
        aux_weight,
        OptimSpec(warmup_steps=1),
        InferenceSpec(**inference),
    )


def pretrained_lm(folder: Path):
    """A tiny Llama saved in ``folder`` as a pretrained LM whose tokenizer lacks the grounding tokens;
    returns that tokenizer with them."""
    base = train_local_tokenizer(corpus(), 300)
    config = LlamaConfig(
        vocab_size=len(base), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    base.save_pretrained(folder)
    return tokenizer()
