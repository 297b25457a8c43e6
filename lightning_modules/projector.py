"""Projectors from per-frame visual features to the LM's embedding space."""

from __future__ import annotations

import torch
from torch import nn


class FrameProjector(nn.Module):
    """``linear`` (one layer) or ``mlp`` (two layers with GELU, LLaVA's mlp2x_gelu).

    ``frames_per_token`` consecutive frames are concatenated into one LM token (no information is
    averaged away; the LM reads ``num_frames / frames_per_token`` video tokens). With
    ``temporal_embedding`` a learned vector per video token is added, so each token carries its
    position on the 00-99 timeline explicitly.
    """

    def __init__(
        self,
        kind: str,
        feature_dim: int,
        hidden_size: int,
        num_frames: int,
        temporal_embedding: bool,
        frames_per_token: int = 1,
    ) -> None:
        super().__init__()
        if frames_per_token < 1 or num_frames % frames_per_token:
            raise ValueError(
                f"frames_per_token={frames_per_token} must be >= 1 and divide {num_frames} frames"
            )
        self.frames_per_token = frames_per_token
        in_dim = feature_dim * frames_per_token
        if kind == "linear":
            self.net: nn.Module = nn.Linear(in_dim, hidden_size)
        elif kind == "mlp":
            self.net = nn.Sequential(
                nn.Linear(in_dim, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size)
            )
        else:
            raise ValueError(f"unknown projector kind {kind!r}; choose 'linear' or 'mlp'")
        tokens = num_frames // frames_per_token
        self.time = nn.Embedding(tokens, hidden_size) if temporal_embedding else None
        if self.time is not None:
            nn.init.normal_(self.time.weight, std=0.02)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(..., T, D)`` frames to ``(..., T / frames_per_token, hidden)`` tokens."""
        *lead, frames, dim = features.shape
        if frames % self.frames_per_token:
            raise ValueError(f"{frames} frames do not split into tokens of {self.frames_per_token}")
        merged = features.reshape(*lead, frames // self.frames_per_token, dim * self.frames_per_token)
        tokens = self.net(merged)
        if self.time is not None:
            tokens = tokens + self.time.weight[: tokens.shape[-2]].to(tokens.dtype)
        return tokens


def build_projector(
    kind: str,
    feature_dim: int,
    hidden_size: int,
    num_frames: int = 100,
    temporal_embedding: bool = False,
    frames_per_token: int = 1,
) -> FrameProjector:
    return FrameProjector(kind, feature_dim, hidden_size, num_frames, temporal_embedding, frames_per_token)
