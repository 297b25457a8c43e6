"""TimeRefine target generation: coarse segments around the ground truth and exact offsets.

A target is a list of ``K + 1`` :class:`RefineRound`. Round ``i`` holds a coarse segment sampled with
noise ``std[i]`` and the offsets that move it onto the ground truth, all in frame-index space,
so ``coarse + offset == ground truth`` holds exactly (the reference). With ``residual_std`` the
offsets of the rounds before the last one stop short of the truth by a shrinking random residual,
so the context of a later round no longer spells the truth out; the last round is always exact.
Zero refinement steps give one round with the ground truth itself and no offsets: the plain
direct-prediction answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from timerefine.answer_format.timeline import MAX_INDEX


@dataclass(frozen=True)
class RefineRound:
    """One round of an answer: a coarse segment ``[start, end]`` (frame indices) and its offsets."""

    start: int
    end: int
    offset_start: int = 0
    offset_end: int = 0

    @property
    def refined(self) -> tuple[int, int]:
        return self.start + self.offset_start, self.end + self.offset_end


@dataclass(frozen=True)
class RefineSchedule:
    """``model.refine``: ``steps`` is K, the number of refinement steps (0 = direct answers); the
    other fields say how the coarse segments of the target rounds are drawn.

    ``noise_std`` lists one std per round. A list of another length is interpolated linearly over
    the rounds, so ``[5, 3, 1, 0]`` also serves K=1 and K=2.
    ``relative`` reads the stds as fractions of the duration instead of seconds.
    ``residual_std`` (same units, interpolated the same way; empty = exact offsets everywhere)
    is the std of the error left in each refined answer but the last.
    """

    steps: int = 3
    noise_std: tuple[float, ...] = (5.0, 3.0, 1.0, 0.0)
    relative: bool = False
    contain_gt: bool = True
    residual_std: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"refinement steps must be >= 0, got {self.steps}")
        if not self.noise_std or min(self.noise_std) < 0:
            raise ValueError(f"noise_std must be a non-empty list of stds >= 0, got {self.noise_std}")
        if self.residual_std and min(self.residual_std) < 0:
            raise ValueError(f"residual_std must list stds >= 0, got {self.residual_std}")

    @property
    def num_rounds(self) -> int:
        """Rounds (coarse segment + offsets) of an answer: the first one, then one per refinement step."""
        return self.steps + 1

    @property
    def with_offsets(self) -> bool:
        """Whether rounds carry offsets; a direct answer (K = 0) is the bare segment."""
        return self.steps > 0

    @property
    def num_segments(self) -> int:
        """Segments an answer predicts: the first coarse one, then each round's refined one; a
        direct answer predicts one."""
        return self.steps + 2 if self.with_offsets else 1

    def stds(self) -> list[float]:
        """One coarse-noise std per round."""
        return per_round(self.noise_std, self.num_rounds)

    def residual_stds(self) -> list[float]:
        """One residual std per round; the last is 0 (the final answer is exact)."""
        if not self.residual_std:
            return [0.0] * self.num_rounds
        return [*per_round(self.residual_std, self.num_rounds)[:-1], 0.0]


def per_round(stds: tuple[float, ...], count: int) -> list[float]:
    """``stds`` as ``count`` values: as given when the lengths match, else linearly interpolated."""
    if len(stds) == count:
        return list(stds)
    return list(np.interp(np.linspace(0.0, 1.0, count), np.linspace(0.0, 1.0, len(stds)), stds))


def sample_coarse(
    gt: tuple[int, int], std: float, contain_gt: bool, rng: np.random.Generator
) -> tuple[int, int]:
    """One segment around ``gt`` with Gaussian noise of ``std`` frame indices, clipped and ordered."""
    noise = rng.normal(0.0, std, size=2) if std > 0 else np.zeros(2)
    if contain_gt:
        noise = np.array([-abs(noise[0]), abs(noise[1])])
    start, end = (int(np.clip(round(g + n), 0, MAX_INDEX)) for g, n in zip(gt, noise, strict=True))
    return (start, end) if start <= end else (end, start)


def make_target_rounds(
    gt: tuple[int, int],
    duration: float,
    schedule: RefineSchedule,
    rng: np.random.Generator,
    first_coarse: tuple[int, int] | None = None,
) -> list[RefineRound]:
    """The full target for one query; ``gt`` is ``(start, end)`` in frame indices.

    ``first_coarse`` replaces the first sampled segment, e.g. with the model's own earlier
    prediction (on-policy refinement).
    """
    if not schedule.with_offsets:
        return [RefineRound(*gt)]
    scale = MAX_INDEX if schedule.relative else MAX_INDEX / duration
    rounds = []
    for i, (std, residual) in enumerate(zip(schedule.stds(), schedule.residual_stds(), strict=True)):
        coarse = sample_coarse(gt, std * scale, schedule.contain_gt, rng)
        if i == 0 and first_coarse is not None:
            coarse = first_coarse
        target = sample_coarse(gt, residual * scale, False, rng) if residual > 0 else gt
        rounds.append(RefineRound(coarse[0], coarse[1], target[0] - coarse[0], target[1] - coarse[1]))
    return rounds


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for one sample in one epoch: fresh noise each epoch, reproducible."""
    return np.random.default_rng([seed, epoch, index])


def on_policy_draw(seed: int, epoch: int, index: int) -> float:
    """A uniform [0, 1) draw for one sample in one epoch, independent of its target noise: the
    sample starts from the model's own coarse guess when it is below the on-policy fraction."""
    return float(np.random.default_rng([seed, epoch, index, 1]).random())
