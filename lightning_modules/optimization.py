"""How the module is optimised: AdamW on the trainable parameter groups, a linear warmup then cosine
decay that starts after the projector's first steps, and the check that the loss stays finite."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from grounding.checks import (
    NON_NEGATIVE,
    POSITIVE,
    PROBABILITY,
    Checked,
    checked,
    integer,
    items,
    number,
    optional,
)
from lightning_modules.param_groups import optimizer_groups


@dataclass
class OptimSpec(Checked):
    """AdamW, linear warmup, cosine decay to ``min_lr_ratio`` x lr. ``warmup_ratio`` > 0 replaces
    ``warmup_steps`` by that share of the run's steps, rounded up (Hugging Face Trainer's rule).
    The defaults suit the built-in default run (a small LM trained from scratch: lr 3e-3 reaches in
    540 steps what 1e-3 did in 1,200); pretrained LMs start from ``experiment=reference_recipe``.
    ``projector_lr``: the lr of the parts outside the LM (projector, heads), which start from scratch
    while adapters nudge a pretrained LM (LLaVA's ``mm_projector_lr``); None: ``lr``."""

    lr: float = checked(3e-3, POSITIVE)
    weight_decay: float = checked(0.01, NON_NEGATIVE)
    warmup_steps: int = checked(100, integer(0))
    warmup_ratio: float = checked(0.0, number(0, 1, open_high=True))
    min_lr_ratio: float = checked(0.05, PROBABILITY)
    projector_lr: float | None = checked(None, optional(POSITIVE))
    betas: tuple[float, float] = checked((0.9, 0.98), items(number(0, 1, open_high=True), 2, 2))

    def warmup(self, total_steps: int) -> int:
        return math.ceil(self.warmup_ratio * total_steps) if self.warmup_ratio > 0 else self.warmup_steps


def lr_curve(first: int, warmup: int, total: int, floor: float) -> Callable[[int], float]:
    """The LR factor of a step: 1 for the ``first`` (projector) steps, then over the ``total`` steps
    after them a linear warmup of ``warmup`` steps and a cosine decay to ``floor``."""

    def factor(step: int) -> float:
        if step < first:
            return 1.0
        step -= first
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def adamw_with_curve(module: nn.Module, spec: OptimSpec, first: int, steps: int) -> dict[str, Any]:
    """Lightning's ``configure_optimizers`` answer for a run of ``steps`` optimizer steps, ``first``
    of them projector steps at the full lr."""
    groups = optimizer_groups(module, spec.lr, spec.weight_decay, spec.projector_lr)
    optimizer = torch.optim.AdamW(groups, lr=spec.lr, betas=tuple(spec.betas))
    total = max(steps - first, 1)
    curve = lr_curve(first, spec.warmup(total), total, spec.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, curve)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class NonFiniteLossError(ArithmeticError):
    """Training diverged: the loss is NaN or infinite. The weights that gave it are no resume point, so
    ``last.ckpt`` keeps the step before (callbacks/last_checkpoint.py)."""


def diverged(what: str, step: int, lr: float) -> NonFiniteLossError:
    return NonFiniteLossError(
        f"{what} at step {step}: training diverged (the last checkpoint before it is kept); lower "
        f"model.optim.lr (now {lr:g}) or set trainer.gradient_clip_val"
    )


def finite_loss(loss: torch.Tensor, step: int, lr: float) -> torch.Tensor:
    """``loss``, or NonFiniteLossError naming the step and the learning rate."""
    if not torch.isfinite(loss.detach()).all():
        raise diverged(f"train/loss is {loss.item()}", step, lr)
    return loss
