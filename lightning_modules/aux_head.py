"""TimeRefine's auxiliary head: regress the normalized ground truth from the hidden state at <OFFSET>.

Losses grow with the distance from the truth: ``l1`` (the reference), ``giou``, ``l1_giou``, and
``distance`` (expected |bin - truth| under a softmax over the 100 time bins).

``scaling`` says what lambda multiplies: ``lambda``, the loss itself (the mean over the ``<OFFSET>`` tokens
of |start error| + |end error|); ``reference``, the official code's ``L1Loss()(pred, gt) / N``, the mean
absolute error divided again by N, the number of scalars in the micro-batch (with lambda 10 there).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from grounding.answer_format.timeline import DEFAULT_TIMELINE, NUM_BINS, Timeline
from grounding.checks import NON_NEGATIVE, Checked, checked, one_of

AUX_LOSSES = ("l1", "giou", "l1_giou", "distance")
AUX_SCALINGS = ("lambda", "reference")


@dataclass(frozen=True)
class AuxSpec(Checked):
    """``weight`` is lambda in LM loss + lambda x aux loss (0 turns the head off); ``loss``: one of
    AUX_LOSSES; ``head``: linear | mlp; ``scaling``: one of AUX_SCALINGS (``reference`` needs ``l1``)."""

    weight: float = checked(1.0, NON_NEGATIVE)
    loss: str = checked("l1", one_of(*AUX_LOSSES))
    head: str = checked("mlp", one_of("linear", "mlp"))
    scaling: str = checked("lambda", one_of(*AUX_SCALINGS))

    def relations(self) -> Iterator[str]:
        if self.scaling == "reference" and self.loss != "l1":
            yield f"scaling=reference needs loss=l1, got {self.loss}"


class AuxHead(nn.Module):
    """Linear or MLP head; outputs a normalized ``[start, end]`` and, for ``distance``, bin logits over
    the indices of ``timeline``."""

    def __init__(
        self,
        hidden_size: int,
        kind: str,
        loss: str,
        scaling: str = "lambda",
        timeline: Timeline = DEFAULT_TIMELINE,
    ) -> None:
        super().__init__()
        if loss not in AUX_LOSSES:
            raise ValueError(f"unknown aux loss {loss!r}; choose from {AUX_LOSSES}")
        if kind not in ("linear", "mlp"):
            raise ValueError(f"unknown aux head kind {kind!r}; choose 'linear' or 'mlp'")
        if scaling not in AUX_SCALINGS or (scaling == "reference" and loss != "l1"):
            raise ValueError(f"aux scaling {scaling!r}: choose from {AUX_SCALINGS} (reference needs loss l1)")
        self.loss_name, self.scaling, self.span = loss, scaling, timeline.span
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
        out = self.net(hidden.to(next(self.net.parameters()).dtype))  # fp32 beside a bf16 LM
        if self.loss_name != "distance":
            return torch.sigmoid(out), None
        logits = out.view(-1, 2, NUM_BINS)
        bins = torch.arange(NUM_BINS, device=out.device, dtype=out.dtype) / self.span
        return (logits.softmax(-1) * bins).sum(-1), logits

    def loss(self, segment: torch.Tensor, logits: torch.Tensor | None, target: torch.Tensor) -> torch.Tensor:
        """Mean loss over rows; zero (with a gradient path) when there are no rows."""
        if segment.shape[0] == 0:
            return segment.sum() * 0.0
        if self.scaling == "reference":
            return reference_l1_loss(segment, target)
        if self.loss_name == "l1":
            return l1_loss(segment, target)
        if self.loss_name == "giou":
            return giou_loss(segment, target)
        if self.loss_name == "l1_giou":
            return l1_loss(segment, target) + giou_loss(segment, target)
        assert logits is not None
        return distance_loss(logits, target, self.span)


def l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred - target).abs().sum(-1).mean()


def reference_l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The official code's ``nn.L1Loss()(pred, gt) / N``, N the number of scalars (it divides twice)."""
    return F.l1_loss(pred, target) / pred.numel()


def giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - generalized IoU of 1-D segments; ends are ordered first so any output is a segment."""
    pred = torch.sort(pred, dim=-1).values
    inter = (torch.minimum(pred[:, 1], target[:, 1]) - torch.maximum(pred[:, 0], target[:, 0])).clamp(min=0)
    union = (pred[:, 1] - pred[:, 0]) + (target[:, 1] - target[:, 0]) - inter
    hull = torch.maximum(pred[:, 1], target[:, 1]) - torch.minimum(pred[:, 0], target[:, 0])
    iou = inter / union.clamp(min=1e-6)
    return (1 - (iou - (hull - union) / hull.clamp(min=1e-6))).mean()


def distance_loss(
    logits: torch.Tensor, target: torch.Tensor, span: int = DEFAULT_TIMELINE.span
) -> torch.Tensor:
    """Expected absolute bin distance to the truth, in units of the whole video; bin i is at i / span."""
    bins = torch.arange(NUM_BINS, device=logits.device, dtype=logits.dtype) / span
    distance = (bins.view(1, 1, -1) - target.unsqueeze(-1)).abs()
    return (logits.softmax(-1) * distance).sum(-1).sum(-1).mean()
