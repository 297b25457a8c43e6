"""Projectors from per-frame visual features to the LM's embedding space."""

from __future__ import annotations

import torch
from torch import nn


class FrameProjector(nn.Module):
    """``linear`` (one layer) or ``mlp`` (two layers with GELU, LLaVA's mlp2x_gelu).

    With ``temporal_embedding`` a learned vector per frame index is added, so each frame token
    carries its position on the 00-99 timeline explicitly.
    """

    def __init__(
        self, kind: str, feature_dim: int, hidden_size: int, num_frames: int, temporal_embedding: bool
    ) -> None:
        super().__init__()
        if kind == "linear":
            self.net: nn.Module = nn.Linear(feature_dim, hidden_size)
        elif kind == "mlp":
            self.net = nn.Sequential(
                nn.Linear(feature_dim, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size)
            )
        else:
            raise ValueError(f"unknown projector kind {kind!r}; choose 'linear' or 'mlp'")
        self.time = nn.Embedding(num_frames, hidden_size) if temporal_embedding else None
        if self.time is not None:
            nn.init.normal_(self.time.weight, std=0.02)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        frames = self.net(features)
        if self.time is not None:
            frames = frames + self.time.weight[: features.shape[1]].to(frames.dtype)
        return frames


def build_projector(
    kind: str, feature_dim: int, hidden_size: int, num_frames: int = 100, temporal_embedding: bool = False
) -> FrameProjector:
    return FrameProjector(kind, feature_dim, hidden_size, num_frames, temporal_embedding)
