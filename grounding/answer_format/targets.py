"""TimeRefine target generation: coarse segments around the ground truth and their offsets.

A target is a list of ``K + 1`` :class:`RefineRound`. Round ``i`` holds a coarse segment sampled with
noise ``std[i]`` and the offsets that move it onto the ground truth. ``refine.offset_space`` says where:

- ``index`` (default): everything in frame-index space, so ``coarse + offset == ground truth`` holds
  exactly. With ``residual_std`` the offsets of the rounds before the last one stop short of the
  truth by a shrinking random residual, so the context of a later round no longer spells the truth
  out; the last round is always exact.
- ``seconds`` (the official TimeRefine data script): coarse segments are drawn in seconds, by
  rejection until they contain the ground truth, and the offsets are computed in seconds; coarse
  segment and offsets are then rounded to indices separately, so ``coarse + offset`` can miss the
  ground-truth index by one, and an offset that rounds to zero keeps its sign (``-00``).

``refine.resample`` draws the noise afresh every epoch (``epoch``) or once per sample (``once``, as
the reference writes its targets to a file before training). Zero refinement steps give one round
with the ground truth itself and no offsets: the plain direct-prediction answer.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from grounding.answer_format.timeline import DEFAULT_TIMELINE, MAX_INDEX, Timeline
from grounding.checks import NON_NEGATIVE, Checked, checked, integer, items, one_of, optional

OFFSET_SPACES = ("index", "seconds")
RESAMPLING = ("epoch", "once")


@dataclass(frozen=True)
class RefineRound:
    """One round of an answer: a coarse segment ``[start, end]`` (frame indices) and its offsets.
    ``zero_signs`` are the signs written for offsets of 0 (``-`` writes ``-00``)."""

    start: int
    end: int
    offset_start: int = 0
    offset_end: int = 0
    zero_signs: str = "++"

    @property
    def refined(self) -> tuple[int, int]:
        return self.start + self.offset_start, self.end + self.offset_end


@dataclass(frozen=True)
class RefineSchedule(Checked):
    """``model.refine``: ``steps`` is K, the number of refinement steps (0 = direct answers); the
    other fields say how the coarse segments of the target rounds are drawn.

    ``noise_std`` lists one std per round. A list of another length is interpolated linearly over
    the rounds, so ``[5, 3, 1, 0]`` also serves K=1 and K=2.
    ``relative`` reads the stds as fractions of the duration instead of seconds.
    ``residual_std`` (same units, interpolated the same way; empty or null = exact offsets everywhere)
    is the std of the error left in each refined answer but the last (``offset_space: index`` only).
    ``offset_space``: index | seconds and ``resample``: epoch | once (see the module docstring).
    """

    steps: int = checked(3, integer(0))
    noise_std: tuple[float, ...] = checked((5.0, 3.0, 1.0, 0.0), items(NON_NEGATIVE, 1))
    relative: bool = False
    contain_gt: bool = True
    residual_std: tuple[float, ...] | None = checked((), optional(items(NON_NEGATIVE)))
    offset_space: str = checked("index", one_of(*OFFSET_SPACES))
    resample: str = checked("epoch", one_of(*RESAMPLING))

    def relations(self) -> Iterator[str]:
        if self.residual_std and self.offset_space == "seconds":
            yield "residual_std needs offset_space=index: seconds-space offsets are exact"

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
    start, end = (min(max(round(float(g + n)), 0), MAX_INDEX) for g, n in zip(gt, noise, strict=True))
    return (start, end) if start <= end else (end, start)


def make_target_rounds(
    gt: tuple[int, int],
    duration: float,
    schedule: RefineSchedule,
    rng: np.random.Generator,
    first_coarse: tuple[int, int] | None = None,
    timeline: Timeline = DEFAULT_TIMELINE,
) -> list[RefineRound]:
    """The full index-space target for one query; ``gt`` is ``(start, end)`` in frame indices.

    ``first_coarse`` replaces the first sampled segment, e.g. with the model's own earlier
    prediction (on-policy refinement).
    """
    if not schedule.with_offsets:
        return [RefineRound(*gt)]
    scale = timeline.span if schedule.relative else timeline.span / duration
    rounds = []
    for i, (std, residual) in enumerate(zip(schedule.stds(), schedule.residual_stds(), strict=True)):
        coarse = sample_coarse(gt, std * scale, schedule.contain_gt, rng)
        if i == 0 and first_coarse is not None:
            coarse = first_coarse
        target = sample_coarse(gt, residual * scale, False, rng) if residual > 0 else gt
        rounds.append(RefineRound(coarse[0], coarse[1], target[0] - coarse[0], target[1] - coarse[1]))
    return rounds


def sample_coarse_seconds(
    gt: tuple[float, float], std: float, duration: float, contain_gt: bool, rng: np.random.Generator
) -> tuple[float, float]:
    """The reference's draw: both ends ~ N(truth, ``std`` seconds), ordered, clipped to the video,
    redrawn while the segment is empty or (``contain_gt``) does not contain ``gt``."""
    while True:
        a, b = rng.normal(gt[0], std), rng.normal(gt[1], std)
        start, end = max(0.0, min(a, b)), min(duration, max(a, b))
        if start <= end and (not contain_gt or (start <= gt[0] and end >= gt[1])):
            return float(start), float(end)


def seconds_offset_round(
    coarse_index: tuple[int, int],
    offsets: tuple[float, float],
    duration: float,
    timeline: Timeline,
) -> RefineRound:
    """A round from its coarse indices and offsets in seconds, each offset rounded to index steps on
    its own (``-`` for a negative one, even when it rounds to ``00``)."""
    steps = [timeline.to_steps(abs(x), duration) for x in offsets]
    signed = [-n if x < 0 else n for n, x in zip(steps, offsets, strict=True)]
    zero_signs = "".join("-" if x < 0 and n == 0 else "+" for n, x in zip(steps, offsets, strict=True))
    return RefineRound(coarse_index[0], coarse_index[1], signed[0], signed[1], zero_signs)


def make_seconds_target_rounds(
    gt: tuple[float, float],
    duration: float,
    schedule: RefineSchedule,
    timeline: Timeline,
    rng: np.random.Generator,
    first_coarse: tuple[int, int] | None = None,
) -> list[RefineRound]:
    """The reference target for one query, ``gt`` in seconds: coarse segments and offsets in seconds,
    rounded to indices separately (``first_coarse``, in indices, replaces the first segment)."""
    gt_index = (timeline.to_index(gt[0], duration), timeline.to_index(gt[1], duration))
    if not schedule.with_offsets:
        return [RefineRound(*gt_index)]
    scale = duration if schedule.relative else 1.0
    rounds = []
    for i, std in enumerate(schedule.stds()):
        coarse = sample_coarse_seconds(gt, std * scale, duration, schedule.contain_gt, rng)
        index = (timeline.to_index(coarse[0], duration), timeline.to_index(coarse[1], duration))
        if i == 0 and first_coarse is not None:
            index = first_coarse
            coarse = (timeline.to_seconds(index[0], duration), timeline.to_seconds(index[1], duration))
        offsets = (gt[0] - coarse[0], gt[1] - coarse[1])
        rounds.append(seconds_offset_round(index, offsets, duration, timeline))
    return rounds


def draw_target_rounds(
    gt: tuple[float, float],
    duration: float,
    schedule: RefineSchedule,
    timeline: Timeline,
    rng: np.random.Generator,
    first_coarse: tuple[int, int] | None = None,
) -> list[RefineRound]:
    """The target of one query whose ground truth ``gt`` is in seconds, in ``schedule.offset_space``."""
    if schedule.offset_space == "seconds":
        return make_seconds_target_rounds(gt, duration, schedule, timeline, rng, first_coarse)
    gt_index = (timeline.to_index(gt[0], duration), timeline.to_index(gt[1], duration))
    return make_target_rounds(gt_index, duration, schedule, rng, first_coarse, timeline)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for one sample in one epoch: fresh noise each epoch, reproducible."""
    return np.random.default_rng([seed, epoch, index])


def target_rng(seed: int, epoch: int, index: int, resample: str) -> np.random.Generator:
    """The target noise of one sample: drawn per epoch, or ``once`` (the epoch-0 draw every epoch)."""
    return sample_rng(seed, epoch if resample == "epoch" else 0, index)


def on_policy_draw(seed: int, epoch: int, index: int) -> float:
    """A uniform [0, 1) draw for one sample in one epoch, independent of its target noise: the
    sample starts from the model's own coarse guess when it is below the on-policy fraction."""
    return float(np.random.default_rng([seed, epoch, index, 1]).random())
