"""Projectors from per-frame visual features to the LM's embedding space."""

from __future__ import annotations

from torch import nn


def build_projector(kind: str, feature_dim: int, hidden_size: int) -> nn.Module:
    """``linear`` (one layer) or ``mlp`` (two layers with GELU, LLaVA's mlp2x_gelu)."""
    if kind == "linear":
        return nn.Linear(feature_dim, hidden_size)
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(feature_dim, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size)
        )
    raise ValueError(f"unknown projector kind {kind!r}; choose 'linear' or 'mlp'")
