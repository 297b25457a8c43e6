"""Temporal IoU and recall: pure functions on ``(N, 2)`` tensors of ``[start, end]``."""

from __future__ import annotations

import torch

THRESHOLDS = (0.3, 0.5, 0.7)


def temporal_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Row-wise IoU of segments; ``NaN`` rows (unparseable predictions) and empty unions give 0."""
    pred, target = pred.double(), target.double()
    inter = (torch.minimum(pred[:, 1], target[:, 1]) - torch.maximum(pred[:, 0], target[:, 0])).clamp(min=0)
    union = torch.maximum(pred[:, 1], target[:, 1]) - torch.minimum(pred[:, 0], target[:, 0])
    iou = torch.where(
        union > 0, inter / torch.where(union > 0, union, torch.ones_like(union)), torch.zeros_like(union)
    )
    identical_points = (pred == target).all(dim=1) & (union == 0)
    iou = torch.where(identical_points, torch.ones_like(iou), iou)
    return torch.nan_to_num(iou, nan=0.0)
