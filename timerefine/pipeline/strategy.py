"""Turn ``trainer.strategy`` into a Lightning strategy; a mapping with ``name: fsdp`` gets decoder-layer
auto-wrapping for whatever LM the module holds."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import Strategy
from torch import nn
from torch.distributed.fsdp import ShardingStrategy

from callbacks.lightning_compat import KeptRootFSDPStrategy
from timerefine.pipeline.config import ConfigError


def decoder_layer_classes(model: nn.Module) -> set[type[nn.Module]]:
    """Transformer block classes of any Hugging Face LM (LlamaDecoderLayer, Qwen2DecoderLayer, ...)."""
    return {type(m) for m in model.modules() if type(m).__name__.endswith("DecoderLayer")}


# Lightning's names of FSDP, built as the mapping ``{name: fsdp}`` builds it (Lightning's own strategy
# of that name loses its root unit after fitting, and wraps the model as one unit)
FSDP_NAMES = {"fsdp": {"name": "fsdp"}, "fsdp_cpu_offload": {"name": "fsdp", "cpu_offload": True}}


def build_strategy(spec: Any, model: nn.Module) -> str | Strategy:
    if isinstance(spec, str):
        if spec not in FSDP_NAMES:
            return spec
        spec = FSDP_NAMES[spec]
    options = dict(spec)
    name = options.pop("name", None)
    if name != "fsdp":
        raise ConfigError(
            f"trainer.strategy mapping needs name: fsdp, got {name!r}; use a string for other strategies"
        )
    layers = (
        decoder_layer_classes(model)
        if options.pop("auto_wrap", "decoder_layers") == "decoder_layers"
        else None
    )
    if layers is not None and not layers:
        raise ConfigError(
            "trainer.strategy.auto_wrap=decoder_layers found no *DecoderLayer modules in the LM"
        )
    checkpointing = layers if options.pop("activation_checkpointing", False) else None
    sharding = options.pop("sharding_strategy", "FULL_SHARD")
    if isinstance(sharding, str) and sharding.upper() not in ShardingStrategy.__members__:
        raise ConfigError(
            f"trainer.strategy.sharding_strategy={sharding}: one of {', '.join(ShardingStrategy.__members__)}"
        )
    return KeptRootFSDPStrategy(
        auto_wrap_policy=layers,
        activation_checkpointing_policy=checkpointing,
        state_dict_type=options.pop("state_dict_type", "sharded"),
        sharding_strategy=sharding,
        cpu_offload=options.pop("cpu_offload", False),
        use_orig_params=True,  # LoRA / trainable token rows mix frozen and trainable parameters
        **options,
    )
