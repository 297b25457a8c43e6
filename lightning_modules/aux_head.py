"""TimeRefine's auxiliary head: regress the normalized ground truth from the hidden state at <OFFSET>.

Losses grow with the distance from the truth: ``l1`` (the reference), ``giou``, ``l1_giou``, and
``distance`` (expected |bin - truth| under a softmax over the 100 time bins).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from timerefine.answer_format.timeline import MAX_INDEX, NUM_BINS

AUX_LOSSES = ("l1", "giou", "l1_giou", "distance")


@dataclass(frozen=True)
class AuxSpec:
    """``weight`` is lambda in LM loss + lambda x aux loss (0 turns the head off); ``loss``: one of
    AUX_LOSSES; ``head``: linear | mlp."""

    weight: float = 1.0
    loss: str = "l1"
    head: str = "mlp"


class AuxHead(nn.Module):
    """Linear or MLP head; outputs a normalized ``[start, end]`` and, for ``distance``, bin logits."""

    def __init__(self, hidden_size: int, kind: str, loss: str) -> None:
        super().__init__()
        if loss not in AUX_LOSSES:
            raise ValueError(f"unknown aux loss {loss!r}; choose from {AUX_LOSSES}")
        if kind not in ("linear", "mlp"):
            raise ValueError(f"unknown aux head kind {kind!r}; choose 'linear' or 'mlp'")
        self.loss_name = loss
        outputs = 2 * NUM_BINS if loss == "distance" else 2
        self.net = (
            nn.Linear(hidden_size, outputs)
            if kind == "linear"
            else nn.Sequential(
                nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, outputs)
            )
        )

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(segment (N, 2) in [0, 1], bin logits (N, 2, 100) or None)``."""
        out = self.net(hidden.float())
        if self.loss_name != "distance":
            return torch.sigmoid(out), None
        logits = out.view(-1, 2, NUM_BINS)
        bins = torch.arange(NUM_BINS, device=out.device, dtype=out.dtype) / MAX_INDEX
        return (logits.softmax(-1) * bins).sum(-1), logits

    def loss(self, segment: torch.Tensor, logits: torch.Tensor | None, target: torch.Tensor) -> torch.Tensor:
        """Mean loss over rows; zero (with a gradient path) when there are no rows."""
        if segment.shape[0] == 0:
            return segment.sum() * 0.0
        if self.loss_name == "l1":
            return l1_loss(segment, target)
        if self.loss_name == "giou":
            return giou_loss(segment, target)
        if self.loss_name == "l1_giou":
            return l1_loss(segment, target) + giou_loss(segment, target)
        assert logits is not None
        return distance_loss(logits, target)


def l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred - target).abs().sum(-1).mean()


def giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - generalized IoU of 1-D segments; ends are ordered first so any output is a segment."""
    pred = torch.sort(pred, dim=-1).values
    inter = (torch.minimum(pred[:, 1], target[:, 1]) - torch.maximum(pred[:, 0], target[:, 0])).clamp(min=0)
    union = (pred[:, 1] - pred[:, 0]) + (target[:, 1] - target[:, 0]) - inter
    hull = torch.maximum(pred[:, 1], target[:, 1]) - torch.minimum(pred[:, 0], target[:, 0])
    iou = inter / union.clamp(min=1e-6)
    return (1 - (iou - (hull - union) / hull.clamp(min=1e-6))).mean()


def distance_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Expected absolute bin distance to the truth, in units of the whole video."""
    bins = torch.arange(NUM_BINS, device=logits.device, dtype=logits.dtype) / MAX_INDEX
    distance = (bins.view(1, 1, -1) - target.unsqueeze(-1)).abs()
    return (logits.softmax(-1) * distance).sum(-1).sum(-1).mean()
