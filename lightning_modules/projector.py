"""Projectors from per-frame visual features to the LM's embedding space."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from grounding.checks import Checked, checked, integer, one_of

TEMPORAL_EMBEDDINGS = ("none", "learned", "digits", "text")


@dataclass(frozen=True)
class ProjectorSpec(Checked):
    """``kind``: linear | mlp. ``temporal_embedding``: what tells a video token its place on the 00-99
    timeline: none | learned (an embedding per token) | digits (the LM's own embeddings of the index
    digits, gated) | text (the index written before the token in the prompt, in the tokens an answer
    writes it with, for the LM to copy). ``frames_per_token`` consecutive frames are concatenated into
    one video token (the last token's missing frames are zeros); ``query_conditioned`` FiLMs the frames
    with the prompt's mean text embedding before projecting them."""

    kind: str = checked("mlp", one_of("linear", "mlp"))
    temporal_embedding: str = checked("learned", one_of(*TEMPORAL_EMBEDDINGS))
    frames_per_token: int = checked(4, integer(1))
    query_conditioned: bool = True


def video_token_count(num_frames: int, frames_per_token: int) -> int:
    """How many video tokens ``num_frames`` frames make, ``frames_per_token`` to a token (rounded up)."""
    return -(-num_frames // frames_per_token)


class FrameProjector(nn.Module):
    """``linear`` (one layer) or ``mlp`` (two layers with GELU, LLaVA's mlp2x_gelu).

    ``frames_per_token`` consecutive frames are concatenated into one LM token (no information is
    averaged away; the LM reads ``video_token_count`` video tokens, the last one's missing frames
    zero). With
    ``temporal_embedding`` a learned vector per video token is added, so each token carries its
    position on the 00-99 timeline explicitly.

    ``query_size`` (the LM's hidden size) turns on query conditioning (FiLM): the frames are scaled
    by ``1 + W q`` before projection, ``q`` the mean embedding of the prompt's text, so whether a
    frame shows what the query names is computed per frame (text-conditioned visual tokens, as in
    LLaMA-VID or InstructBLIP). ``W`` starts at zero: the projector starts unconditioned.
    """

    def __init__(
        self,
        kind: str,
        feature_dim: int,
        hidden_size: int,
        num_frames: int = 100,
        temporal_embedding: bool = False,
        frames_per_token: int = 1,
        query_size: int | None = None,
    ) -> None:
        super().__init__()
        if frames_per_token < 1:
            raise ValueError(f"frames_per_token={frames_per_token} must be >= 1")
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
        self.film = nn.Linear(query_size, in_dim) if query_size else None
        if self.film is not None:
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)
        tokens = video_token_count(num_frames, frames_per_token)
        self.time = nn.Embedding(tokens, hidden_size) if temporal_embedding else None
        if self.time is not None:
            nn.init.normal_(self.time.weight, std=0.02)

    def forward(self, features: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        """``(..., T, D)`` frames to ``(..., video_token_count(T, frames_per_token), hidden)`` tokens;
        ``query`` ``(..., query_size)`` is needed with query conditioning."""
        *lead, frames, dim = features.shape
        tokens = video_token_count(frames, self.frames_per_token)
        if missing := tokens * self.frames_per_token - frames:
            features = F.pad(features, (0, 0, 0, missing))
        merged = features.reshape(*lead, tokens, dim * self.frames_per_token)
        if self.film is not None:
            if query is None:
                raise ValueError("this projector is query-conditioned: pass the query embedding")
            merged = merged * (1 + self.film(query).unsqueeze(-2))
        tokens = self.net(merged)
        if self.time is not None:
            tokens = tokens + self.time.weight[: tokens.shape[-2]].to(tokens.dtype)
        return tokens

    @classmethod
    def from_spec(
        cls, spec: ProjectorSpec, feature_dim: int, hidden_size: int, num_frames: int
    ) -> FrameProjector:
        """The projector ``spec`` describes (``digits`` time embeddings live in the VideoLLM)."""
        return cls(
            spec.kind,
            feature_dim,
            hidden_size,
            num_frames,
            temporal_embedding=spec.temporal_embedding == "learned",
            frames_per_token=spec.frames_per_token,
            query_size=hidden_size if spec.query_conditioned else None,
        )
