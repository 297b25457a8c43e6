"""Weight-decay groups chosen by parameter name and module type, never by shape: under FSDP
(``use_orig_params=True``) the optimizer sees every parameter as a flat 1-D shard."""

from __future__ import annotations

from torch import nn
from transformers.trainer_pt_utils import get_parameter_names

from lightning_modules.base_weights import BASE

# Hugging Face Trainer's rule: biases and normalization weights (LayerNorm modules, or named *norm*).
NO_DECAY_LAYERS = [nn.LayerNorm]
NO_DECAY_NAMES = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def weight_decay_split(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of the trainable parameters that decay (weight matrices, embeddings and their new token
    rows, LoRA, the temporal embedding, the digit gate) and of those that do not (biases, norms)."""
    decays = set(get_parameter_names(model, NO_DECAY_LAYERS, NO_DECAY_NAMES))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    return [n for n in trainable if n in decays], [n for n in trainable if n not in decays]


def optimizer_groups(
    module: nn.Module,
    lr: float,
    weight_decay: float,
    projector_lr: float | None = None,
    lm_prefix: str = BASE,
) -> list[dict]:
    """AdamW's parameter groups: decaying or not, and with ``projector_lr`` the parts outside the LM
    (``lm_prefix``: projector, heads, digit gate; they start from scratch) at that lr apart from the LM's."""
    decay, no_decay = weight_decay_split(module)
    params = dict(module.named_parameters())
    groups = []
    for names, decay_rate in ((decay, weight_decay), (no_decay, 0.0)):
        if projector_lr is None:
            groups.append({"params": [params[n] for n in names], "weight_decay": decay_rate, "lr": lr})
            continue
        for in_lm, group_lr in ((True, lr), (False, projector_lr)):
            chosen = [params[n] for n in names if n.startswith(lm_prefix) == in_lm]
            if chosen:
                groups.append({"params": chosen, "weight_decay": decay_rate, "lr": group_lr})
    return groups
