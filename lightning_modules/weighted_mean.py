"""A weighted mean that sums its parts across processes: what ``val/loss`` and ``test/loss`` are."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class WeightedMean(Metric):
    """The mean of values, each weighted (a batch's loss by its queries), exact under DDP however the
    ranks' shares differ: numerator and weight are summed over them. A NaN value makes it NaN (a
    diverging evaluation shows as one); torchmetrics' MeanMetric drops NaNs, or else the weights."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("weight", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor, weight: float) -> None:
        self.total += value.detach().double() * weight
        self.weight += weight

    def compute(self) -> torch.Tensor:
        return (self.total / self.weight).float()  # logged as the other float32 metrics are
