"""TimeRefine target generation: coarse segments around the ground truth and exact offsets.

A target is a list of :class:`RefineStep`. Step ``i`` holds a coarse segment sampled with
noise ``std[i]`` and the offsets that move it onto the ground truth, all in frame-index space,
so ``coarse + offset == ground truth`` holds exactly. Zero refinement steps give one step with
the ground truth itself and no offsets: the plain direct-prediction answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from datamodules.timeline import MAX_INDEX


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
    """

    steps: int = 3
    noise_std: tuple[float, ...] = (5.0, 3.0, 1.0, 0.0)
    relative: bool = False
    contain_gt: bool = True

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"refinement steps must be >= 0, got {self.steps}")
        if not self.noise_std or min(self.noise_std) < 0:
            raise ValueError(f"noise_std must be a non-empty list of stds >= 0, got {self.noise_std}")

    def stds(self) -> list[float]:
        """One std per segment (``steps + 1`` values)."""
        if len(self.noise_std) == self.steps + 1:
            return list(self.noise_std)
        known = np.linspace(0.0, 1.0, len(self.noise_std))
        return list(np.interp(np.linspace(0.0, 1.0, self.steps + 1), known, self.noise_std))


def sample_coarse(
    gt: tuple[int, int], std: float, contain_gt: bool, rng: np.random.Generator
) -> tuple[int, int]:
    """One coarse segment around ``gt`` with Gaussian noise of ``std`` frame indices."""
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
    for i, std in enumerate(schedule.stds()):
        coarse = sample_coarse(gt, std * scale, schedule.contain_gt, rng)
        if i == 0 and first_coarse is not None:
            coarse = first_coarse
        steps.append(RefineStep(coarse[0], coarse[1], gt[0] - coarse[0], gt[1] - coarse[1]))
    return steps


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for one sample in one epoch: fresh noise each epoch, reproducible."""
    return np.random.default_rng([seed, epoch, index])
