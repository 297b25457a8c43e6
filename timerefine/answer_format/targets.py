"""TimeRefine target generation: coarse segments around the ground truth and exact offsets.

A target is a list of :class:`RefineStep`. Step ``i`` holds a coarse segment sampled with
noise ``std[i]`` and the offsets that move it onto the ground truth, all in frame-index space,
so ``coarse + offset == ground truth`` holds exactly (the reference). With ``residual_std`` the
offsets of the steps before the last one stop short of the truth by a shrinking random residual,
so the context of a later step no longer spells the truth out; the last step is always exact.
Zero refinement steps give one step with the ground truth itself and no offsets: the plain
direct-prediction answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from timerefine.answer_format.timeline import MAX_INDEX


@dataclass(frozen=True)
class RefineStep:
    """A coarse segment ``[start, end]`` (frame indices) and its offsets to the target."""

    start: int
    end: int
    offset_start: int = 0
    offset_end: int = 0

    @property
    def refined(self) -> tuple[int, int]:
        return self.start + self.offset_start, self.end + self.offset_end


@dataclass(frozen=True)
class RefineSchedule:
    """How coarse segments are drawn.

    ``noise_std`` lists one std per segment (coarse + each refinement step). A list of another
    length is interpolated linearly over the steps, so ``[5, 3, 1, 0]`` also serves K=1 and K=2.
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

    def stds(self) -> list[float]:
        """One coarse-noise std per segment (``steps + 1`` values)."""
        return per_segment(self.noise_std, self.steps + 1)

    def residual_stds(self) -> list[float]:
        """One residual std per segment; the last is 0 (the final answer is exact)."""
        if not self.residual_std:
            return [0.0] * (self.steps + 1)
        return [*per_segment(self.residual_std, self.steps + 1)[:-1], 0.0]


def per_segment(stds: tuple[float, ...], count: int) -> list[float]:
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


def make_refine_steps(
    gt: tuple[int, int],
    duration: float,
    schedule: RefineSchedule,
    rng: np.random.Generator,
    first_coarse: tuple[int, int] | None = None,
) -> list[RefineStep]:
    """The full target for one query; ``gt`` is ``(start, end)`` in frame indices.

    ``first_coarse`` replaces the first sampled segment, e.g. with the model's own earlier
    prediction (on-policy refinement).
    """
    if schedule.steps == 0:
        return [RefineStep(*gt)]
    scale = MAX_INDEX if schedule.relative else MAX_INDEX / duration
    steps = []
    for i, (std, residual) in enumerate(zip(schedule.stds(), schedule.residual_stds(), strict=True)):
        coarse = sample_coarse(gt, std * scale, schedule.contain_gt, rng)
        if i == 0 and first_coarse is not None:
            coarse = first_coarse
        target = sample_coarse(gt, residual * scale, False, rng) if residual > 0 else gt
        steps.append(RefineStep(coarse[0], coarse[1], target[0] - coarse[0], target[1] - coarse[1]))
    return steps


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for one sample in one epoch: fresh noise each epoch, reproducible."""
    return np.random.default_rng([seed, epoch, index])


def on_policy_draw(seed: int, epoch: int, index: int) -> float:
    """A uniform [0, 1) draw for one sample in one epoch, independent of its target noise: the
    sample starts from the model's own coarse guess when it is below the on-policy fraction."""
    return float(np.random.default_rng([seed, epoch, index, 1]).random())
