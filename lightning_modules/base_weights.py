"""Checkpoints that hold only what trains: a pretrained LM's frozen weights stay out of them.

A LoRA run's checkpoint keeps the trainable tensors (adapters, new-token rows, projector, heads, ...)
and every buffer, plus the identity of the frozen base weights it was trained on: their name and a
SHA-256 over their names and bytes. Loading rebuilds the model from its base, checks that the base's
frozen weights hash the same, and puts them back into the checkpoint's state dict.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_modules.trainable import LORA, TOKEN_ROWS

IDENTITY = "base_weights"  # the checkpoint key of the base's identity
BASE = "model.lm."  # where the LM sits in a GroundingModule's state dict


class BaseWeightsError(ValueError):
    """A checkpoint trained on other base weights than those the model was rebuilt from."""


def frozen_names(module: nn.Module) -> list[str]:
    """State-dict names of the LM's frozen parameters (tied ones under each of their names), sorted;
    a frozen projector, head or adapter part (token rows that a later stage freezes) is not the base's
    and stays in checkpoints."""
    return sorted(
        n
        for n, p in module.named_parameters(remove_duplicate=False)
        if n.startswith(BASE) and not p.requires_grad and LORA not in n and TOKEN_ROWS not in n
    )


def weights_digest(module: nn.Module, names: list[str]) -> str:
    """SHA-256 over ``names`` and their tensors' dtypes, shapes and bytes."""
    sha = hashlib.sha256()
    state = module.state_dict(keep_vars=True)
    for name in names:
        tensor = state[name].detach().cpu().contiguous()
        sha.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        sha.update(tensor.view(-1).view(torch.uint8).numpy().data if tensor.numel() else b"")
    return sha.hexdigest()


def base_identity(module: nn.Module, name: str) -> dict[str, Any]:
    """The base's name, how many frozen tensors it has and their digest."""
    names = frozen_names(module)
    return {"name": name, "tensors": len(names), "sha256": weights_digest(module, names)}


def without_frozen(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """``state`` less the ``names`` entries."""
    left_out = set(names)
    return {n: t for n, t in state.items() if n not in left_out}


def check_identity(saved: dict[str, Any], identity: dict[str, Any]) -> None:
    """Raise BaseWeightsError when a checkpoint's recorded base (``saved``) is not ``identity``."""
    if (saved["tensors"], saved["sha256"]) != (identity["tensors"], identity["sha256"]):
        raise BaseWeightsError(
            f"the checkpoint was trained on the base LM {saved['name']} (sha256 {saved['sha256'][:12]}, "
            f"{saved['tensors']} frozen tensors), but the model was rebuilt from {identity['name']} "
            f"(sha256 {identity['sha256'][:12]}, {identity['tensors']}): use the run's model.lm "
            "name_or_path and dtype, with the same weights"
        )


def saved_identity(path: Path) -> dict[str, Any] | None:
    """The base identity a checkpoint file records (its tensors are mapped, not read); None if none."""
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True).get(IDENTITY)


def restore_frozen(module: nn.Module, checkpoint: dict[str, Any], identity: dict[str, Any]) -> None:
    """Fill the checkpoint's state dict with ``module``'s frozen tensors, which it left out. Raises
    BaseWeightsError when the checkpoint recorded other base weights than ``identity`` (the module's)."""
    check_identity(checkpoint[IDENTITY], identity)
    state = module.state_dict()
    checkpoint["state_dict"] |= {
        n: state[n] for n in frozen_names(module) if n not in checkpoint["state_dict"]
    }
