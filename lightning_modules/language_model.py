"""The causal LM: pretrained by name/path, or a tiny LLaMA/Qwen2-shaped model built from a config."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.pytorch_utils import Conv1D

from grounding.answer_format.tokens import GROUNDING_TOKENS, TOKEN_STYLES, VIDEO_WHITESPACE
from grounding.checks import POSITIVE, PROBABILITY, Checked, a_name, checked, integer, items, one_of, optional
from lightning_modules.pretrained import (
    LM_DTYPES,
    PACKAGE,
    UnusableModelError,
    missing_model,
    resolve_pretrained,
)
from lightning_modules.released_weights import InitFromSpec, merge_released

TOKEN_ROWS_INITS = ("mean", "resize")
WEIGHTS = (
    "pretrained",
    "random",
)  # model.lm.weights: name_or_path's weights, or its architecture freshly initialised
TINY_ARCHITECTURES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
ALL_LINEAR = "all-linear"  # peft's name for every linear layer of the LM but its output layer


@dataclass
class TinyLMSpec(Checked):
    """Shape of a randomly initialised LM for CPU runs and tests; its vocabulary is the tokenizer's.
    ``tie_word_embeddings``: one matrix for the input and output embeddings (small Qwen2 models)."""

    arch: str = checked("llama", one_of(*TINY_ARCHITECTURES))
    hidden_size: int = checked(128, integer(1))
    num_layers: int = checked(4, integer(1))
    num_heads: int = checked(4, integer(1))
    intermediate_size: int = checked(512, integer(1))
    max_positions: int = checked(512, integer(1))
    tie_word_embeddings: bool = False

    def relations(self) -> Iterator[str]:
        head_size, remainder = divmod(self.hidden_size, self.num_heads)
        if remainder or head_size % 2:  # rotary position embeddings turn pairs of a head's dimensions
            yield (
                f"hidden_size={self.hidden_size} must split into num_heads={self.num_heads} heads of an even "
                "size (rotary position embeddings turn pairs of dimensions), e.g. hidden_size=128 num_heads=4"
            )


@dataclass
class LoraSpec(Checked):
    """LoRA adapters on ``target_modules`` (``[all-linear]``: every linear layer of the LM but its
    output layer, as VTimeLLM/TimeRefine train); the grounding tokens' embedding and output rows train too."""

    r: int = checked(16, integer(1))
    alpha: int = checked(32, POSITIVE)
    dropout: float = checked(0.05, PROBABILITY)
    target_modules: list[str] = checked([ALL_LINEAR], items(a_name, 1))

    def relations(self) -> Iterator[str]:
        if ALL_LINEAR in self.target_modules and len(self.target_modules) > 1:
            yield f"target_modules: {ALL_LINEAR} stands alone (it takes every linear layer); give it or names"


def pretrained_source(value: str) -> str | None:
    """A Hugging Face name, a local folder that exists, or a GGUF or package file that exists (a path
    is never looked up online)."""
    if (missing := missing_model(value)) is not None:
        return missing
    if value.startswith(PACKAGE) or value.endswith(".gguf"):
        return None
    local = value.startswith((".", "/", "~"))
    return f"{value} is not a directory" if local and not Path(value).expanduser().is_dir() else None


@dataclass
class LMSpec(Checked):
    """``name_or_path``: a Hugging Face model name or local folder, a GGUF file, or a package's file
    (``package:<module>/<file>``, lightning_modules/pretrained.py); None builds the tiny LM (random
    init). ``tokenizer``: a tokenizer name or path, whatever the LM (the tiny LM's embeddings take
    its vocabulary size); None: ``name_or_path``'s, or (tiny LM) a BPE trained on the data's text,
    sized by ``tokenizer_vocab_size``. ``weights``: ``pretrained`` loads ``name_or_path``'s weights;
    ``random`` builds its architecture with fresh weights from the run's seed (a from-scratch baseline
    of the same size, with the same tokenizer); no one can rebuild them, so checkpoints hold them whole.
    ``video_whitespace``: the whitespace around a prompt's ``<video>``, ``kept`` as text or ``folded``
    into the token (runs saved before the key; grounding/answer_format/tokens.py)."""

    name_or_path: str | None = checked(None, optional(pretrained_source))
    weights: str = checked("pretrained", one_of(*WEIGHTS))
    tokenizer: str | None = checked(None, optional(pretrained_source))
    tiny: TinyLMSpec = field(default_factory=TinyLMSpec)
    tokenizer_vocab_size: int = checked(1000, integer(1))
    grounding_tokens: str = checked("project", one_of(*TOKEN_STYLES))
    video_whitespace: str = checked("kept", one_of(*VIDEO_WHITESPACE))
    token_rows_init: str = checked("mean", one_of(*TOKEN_ROWS_INITS))
    dtype: str = checked("float32", one_of(*LM_DTYPES))
    gradient_checkpointing: bool = False

    def relations(self) -> Iterator[str]:
        if self.weights == "random" and not self.name_or_path:
            yield "weights=random needs name_or_path: the architecture to initialise (the tiny LM always starts random)"

    @property
    def base(self) -> str | None:
        """The pretrained LM whose weights the model starts from; None when nothing can rebuild them."""
        return self.name_or_path if self.weights == "pretrained" else None


def max_positions(spec: LMSpec) -> int | None:
    """The positions the LM of ``spec`` holds (its config's ``max_position_embeddings``), None if unstated."""
    if not spec.name_or_path:
        return spec.tiny.max_positions
    with loaded_from(resolve_pretrained(spec.name_or_path, spec.dtype)) as source:
        config = AutoConfig.from_pretrained(source)
    return getattr(config, "max_position_embeddings", None)


@contextmanager
def loaded_from(source: str) -> Iterator[str]:
    """``source`` to load a model or its config from; what cannot load from it (a folder of something
    else, a name not reachable offline) is an :class:`UnusableModelError` naming it."""
    try:
        yield source
    except (OSError, ValueError) as error:
        reason = " ".join(str(error).split())
        raise UnusableModelError(
            f"model.lm.name_or_path={source}: no usable language model loads from it ({reason})"
        ) from error


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
        tie_word_embeddings=spec.tie_word_embeddings,
    )
    return model_cls(config)


def grounding_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids of the grounding tokens the tokenizer holds (``<video>`` only in the project's style)."""
    added = tokenizer.get_added_vocab()
    return [added[token] for token in GROUNDING_TOKENS if token in added]


def embedding_layers(model: PreTrainedModel) -> dict[str, torch.nn.Module]:
    """The input and output embedding layers by module name (both, also when their weight is tied)."""
    layers = (model.get_input_embeddings(), model.get_output_embeddings())
    return {name: module for name, module in model.named_modules() if any(module is m for m in layers)}


def untrained_grounding_ids(name_or_path: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The grounding tokens a pretrained LM has no trained rows for: those its own tokenizer lacks
    (all of them when it ships none). A model saved by this project (a merged export) keeps its rows."""
    try:
        own = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError):
        return grounding_token_ids(tokenizer)
    known, added = own.get_vocab(), tokenizer.get_added_vocab()
    return [added[t] for t in GROUNDING_TOKENS if t in added and t not in known]


def init_rows_from_mean(model: PreTrainedModel, token_ids: list[int], vocabulary_size: int) -> None:
    """Set the input and output rows of ``token_ids`` to the mean row of the other tokens of the
    vocabulary (rows past ``vocabulary_size``, a checkpoint's padding, are left out of the mean)."""
    others = torch.ones(vocabulary_size, dtype=torch.bool)
    others[token_ids] = False
    weights = {id(layer.weight): layer.weight for layer in embedding_layers(model).values()}
    with torch.no_grad():
        for weight in weights.values():
            weight[token_ids] = weight[:vocabulary_size][others].float().mean(0).to(weight.dtype)


# The layer types peft's LoRA adapts (transformers' Conv1D: GPT-2's projections).
LORA_LAYERS = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, Conv1D)


class LoraTargetError(ValueError):
    """``model.lora.target_modules`` names a layer the LM lacks, or one LoRA cannot adapt here."""


def check_lora_targets(model: PreTrainedModel, targets: list[str], token_ids: list[int]) -> None:
    """Each of ``targets`` (peft's names: a module's name or its last parts) names a layer of ``model``
    (peft drops the names that match none when another matches), and none the embedding or output layer
    whose ``token_ids`` rows train already, nor a block LoRA cannot adapt (an attention module)."""
    modules = dict(model.named_modules())
    found = {t: [n for n in modules if n == t or n.endswith(f".{t}")] for t in targets if t != ALL_LINEAR}
    linear = f"its linear layers end in: {', '.join(sorted(linear_layer_names(model)))}"
    if missing := [t for t, matched in found.items() if not matched]:
        raise LoraTargetError(
            f"model.lora.target_modules: no layer of {type(model).__name__} is named {', '.join(missing)} "
            f"({linear})"
        )
    if blocks := {
        t: type(modules[n]).__name__
        for t, ns in found.items()
        for n in ns
        if not isinstance(modules[n], LORA_LAYERS)
    }:
        named = ", ".join(f"{t} ({kind})" for t, kind in blocks.items())
        raise LoraTargetError(f"model.lora.target_modules: {named} is a block LoRA cannot adapt ({linear})")
    embedded = set(embedding_layers(model)) if token_ids else set()
    if taken := [t for t, matched in found.items() if embedded & set(matched)]:
        raise LoraTargetError(
            f"model.lora.target_modules: {', '.join(taken)} is an embedding or output layer, whose "
            "grounding-token rows train already; LoRA adapts the layers inside the LM"
        )


def linear_layer_names(model: PreTrainedModel) -> set[str]:
    """The last parts of the names of ``model``'s linear layers (GPT-2's Conv1D among them) but its
    output layer (what ``target_modules`` may name)."""
    output = set(embedding_layers(model))
    linear = (name for name, module in model.named_modules() if isinstance(module, (nn.Linear, Conv1D)))
    return {name.rsplit(".", 1)[-1] for name in linear if name not in output}


def apply_lora(model: PreTrainedModel, spec: LoraSpec, token_ids: list[int]) -> PreTrainedModel:
    """Wrap ``model`` with LoRA; base weights freeze, the input and output rows of ``token_ids`` (the
    new tokens', or none) stay trainable (with tied embeddings peft trains the one matrix's rows for both)."""
    modules = list(spec.target_modules)
    check_lora_targets(model, modules, token_ids)
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=ALL_LINEAR if modules == [ALL_LINEAR] else modules,
        trainable_token_indices={name: list(token_ids) for name in embedding_layers(model)}
        if token_ids
        else None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


@contextmanager
def token_rows_merged(model: nn.Module) -> Iterator[None]:
    """The trained token rows of ``model``'s peft ``TrainableTokensLayer``s written into their
    embedding (and output) weights for the duration: unmerged, peft copies the whole matrix on every
    forward pass (49,152 x 576 for SmolLM2, twice a decoding step). Exact both ways: merging
    replaces the rows and unmerging puts back peft's copy of the originals, which never train. Not for
    a sharded (FSDP) model, whose weights are flat shards."""
    layers = [m for m in model.modules() if isinstance(m, TrainableTokensLayer) and not m.merged]
    for layer in layers:
        layer.merge()
    try:
        yield
    finally:
        for layer in reversed(layers):
            layer.unmerge()


def named_lm(source: str, dtype: str, weights: str) -> PreTrainedModel:
    """The LM of the Hugging Face folder or name ``source``: its weights, or (``random``) its
    architecture initialised from the current random state."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: choose from {', '.join(WEIGHTS)}")
    with loaded_from(source):
        if weights == "random":
            return AutoModelForCausalLM.from_config(
                AutoConfig.from_pretrained(source), dtype=getattr(torch, dtype)
            )
        # from_pretrained returns the model in eval mode: trained so, its dropout would stay off
        return AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype)).train()


def build_language_model(
    tokenizer: PreTrainedTokenizerBase,
    spec: LMSpec,
    lora: LoraSpec | None,
    init_from: InitFromSpec | None = None,
    train_token_rows: bool = True,
    base: PreTrainedModel | None = None,
) -> PreTrainedModel:
    """The LM of ``spec`` (``name_or_path``'s ``weights``, or the tiny one) with its embeddings resized
    to the tokenizer, a pretrained one's grounding-token rows set as ``token_rows_init`` says,
    released adapters merged (``init_from``), optionally LoRA (training the grounding tokens' rows
    unless ``train_token_rows`` is off). ``base``: that LM already made (by an earlier stage that
    merged adapters into it), which gets the gradient checkpointing and LoRA alone."""
    if base is not None:
        model = base
    elif spec.name_or_path:
        source = resolve_pretrained(spec.name_or_path, spec.dtype)
        model = named_lm(source, spec.dtype, spec.weights)
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        untrained = untrained_grounding_ids(source, tokenizer) if spec.weights == "pretrained" else []
        if untrained and spec.token_rows_init == "mean":
            init_rows_from_mean(model, untrained, len(tokenizer))
    else:
        model = build_tiny_lm(spec.tiny, tokenizer).to(getattr(torch, spec.dtype))
    if init_from is not None and base is None:
        model = merge_released(model, tokenizer, init_from)
        if lora is None:  # peft froze the base weights to merge; without adapters the LM trains whole
            model.requires_grad_(True)
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if lora is not None:
        model = apply_lora(model, lora, grounding_token_ids(tokenizer) if train_token_rows else [])
    return model
