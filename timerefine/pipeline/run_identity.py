"""What a trained run is: the config keys its weights and the meaning of its answers depend on.

Evaluating a run with another value of one of them would score another model than the one trained
(another K, answer spelling, LM shape, prompt, frame count), or read its answers' frame indices on
another timeline: evaluate.py refuses such overrides. Under ``model`` only ``model.inference.*`` (how
the final answer is chosen, how many tokens are generated) is an evaluation choice.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

IDENTITY = (
    "model",
    "data.timeline",
    "data.prompt_template",
    "data.chat_template",
    "data.source.num_frames",
    "data.source.feature_dim",
)
EVALUATION = ("model.inference",)
_ABSENT = object()


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == prefix or key.startswith(f"{prefix}.") for prefix in prefixes)


def is_identity(key: str) -> bool:
    return _under(key, IDENTITY) and not _under(key, EVALUATION)


def leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """Every value of a config (or plain mapping) by its dotted key; lists are values."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if not isinstance(node, dict):
        return {prefix.rstrip("."): node}
    return {
        key: value for name, child in node.items() for key, value in leaves(child, f"{prefix}{name}.").items()
    }


def identity_error(trained: DictConfig, evaluated: DictConfig) -> str | None:
    """One line naming the identity keys whose value differs between the run's config and the one to
    evaluate it with, and the run's values; None when there are none."""
    before, after = leaves(trained), leaves(evaluated)
    changed = sorted(
        key
        for key in before.keys() | after.keys()
        if is_identity(key) and before.get(key, _ABSENT) != after.get(key, _ABSENT)
    )
    if not changed:
        return None
    was = ", ".join(f"{key}={before.get(key, 'absent')}" for key in changed)
    return f"{', '.join(changed)}: what the run was trained as cannot change (trained with {was})"
