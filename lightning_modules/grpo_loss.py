"""The GRPO objective (DeepSeekMath; TRL's ``GRPOTrainer``, loss_type ``grpo``) as pure functions of
per-token log-probabilities.

For G answers per query with rewards r: advantages A = (r - mean_group) / (std_group + 1e-4); per
token the ratio rho = exp(logp - logp_old) to the policy that sampled them, the clipped surrogate
min(rho A, clip(rho, 1 - epsilon, 1 + epsilon) A), and the KL to the frozen reference policy by
Schulman's k3 estimator exp(ref - logp) - (ref - logp) - 1, weighted by beta. The loss is the negated
per-token objective averaged over each answer's tokens, then over answers.
"""

from __future__ import annotations

import torch

STD_FLOOR = 1e-4  # TRL's: a group whose rewards are all equal gets advantages 0


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) rewards, each query's ``group_size`` answers in a row -> their group-normalised advantages."""
    grouped = rewards.view(-1, group_size)
    mean, std = grouped.mean(1, keepdim=True), grouped.std(1, keepdim=True)
    return ((grouped - mean) / (std + STD_FLOOR)).view(-1)


def no_signal_share(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """The share of groups whose rewards are all equal (advantages 0: nothing to learn from); with
    rewards per segment, (N, segments), equal in every segment's column."""
    grouped = rewards.view(-1, group_size, *rewards.shape[1:])
    return (grouped == grouped[:, :1]).flatten(1).all(1).float().mean()


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference), Schulman's k3 estimator (non-negative, unbiased)."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon: float,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss over (N, L) per-token log-probabilities (``mask``: the tokens that count), with
    ``advantages`` per answer (N,) or per token (N, L), and its statistics: ``kl`` (mean per token; 0
    without a reference) and ``clip_fraction`` (tokens whose ratio the clip cut off)."""
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    advantages = advantages if advantages.dim() == 2 else advantages[:, None]
    per_token = -torch.min(ratio * advantages, clipped * advantages)
    kl = k3_kl(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    if beta:
        per_token = per_token + beta * kl
    per_answer = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)
    cut = ((ratio < 1 - epsilon) & (advantages < 0)) | ((ratio > 1 + epsilon) & (advantages > 0))
    tokens = mask.sum().clamp(min=1)
    stats = {"kl": (kl * mask).sum() / tokens, "clip_fraction": (cut * mask).sum() / tokens}
    return per_answer.mean(), {k: v.detach() for k, v in stats.items()}
