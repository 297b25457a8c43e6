"""The causal LM: pretrained by name/path, or a tiny LLaMA/Qwen2-shaped model built from a config."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from timerefine.answer_format.tokens import GROUNDING_TOKENS

TINY_ARCHITECTURES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


@dataclass
class TinyLMSpec:
    """Shape of a randomly initialised LM for CPU runs and tests."""

    arch: str = "llama"
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    max_positions: int = 512


@dataclass
class LoraSpec:
    """LoRA adapters on ``target_modules``; the grounding tokens' embedding rows train too."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class LMSpec:
    """``name_or_path``: a Hugging Face model name or local path; None builds the tiny LM (random
    init). ``tokenizer``: a tokenizer name or path, whatever the LM (the tiny LM's embeddings take
    its vocabulary size); None: ``name_or_path``'s, or (tiny LM) a BPE trained on the data's text,
    sized by ``tokenizer_vocab_size``."""

    name_or_path: str | None = None
    tokenizer: str | None = None
    tiny: TinyLMSpec = field(default_factory=TinyLMSpec)
    tokenizer_vocab_size: int = 1000
    dtype: str = "float32"
    gradient_checkpointing: bool = False


def build_tiny_lm(spec: TinyLMSpec, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    if spec.arch not in TINY_ARCHITECTURES:
        raise ValueError(f"unknown tiny LM arch {spec.arch!r}; choose from {sorted(TINY_ARCHITECTURES)}")
    config_cls, model_cls = TINY_ARCHITECTURES[spec.arch]
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return model_cls(config)


def grounding_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return tokenizer.convert_tokens_to_ids(list(GROUNDING_TOKENS))


def apply_lora(model: PreTrainedModel, spec: LoraSpec, token_ids: list[int]) -> PreTrainedModel:
    """Wrap ``model`` with LoRA; base weights freeze, the new tokens' embedding rows stay trainable."""
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        trainable_token_indices=list(token_ids),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def build_language_model(
    tokenizer: PreTrainedTokenizerBase,
    name_or_path: str | None,
    tiny: TinyLMSpec,
    lora: LoraSpec | None,
    dtype: str = "float32",
    gradient_checkpointing: bool = False,
) -> PreTrainedModel:
    """The LM with its embeddings resized to the tokenizer, optionally wrapped with LoRA."""
    if name_or_path:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=getattr(torch, dtype))
    else:
        model = build_tiny_lm(tiny, tokenizer).to(getattr(torch, dtype))
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if lora is not None:
        model = apply_lora(model, lora, grounding_token_ids(tokenizer))
    return model
