"""TimeRefine target generation: coarse segments + exact offsets, schedules, determinism, clipping."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grounding.answer_format.layout import format_answer
from grounding.answer_format.targets import RefineRound, RefineSchedule, make_target_rounds, sample_rng
from grounding.answer_format.timeline import MAX_INDEX, UNIFORM99
from grounding.records import GroundingRecord
from tests import helpers

NUM = r"\d\d"
SIGNED = r"[+-]\d\d"
STEP_WITH_OFFSETS = rf"{NUM} to {NUM} <OFFSET> {SIGNED} and {SIGNED}"


def answer_pattern(k: int) -> re.Pattern[str]:
    if k == 0:
        return re.compile(rf"From <SEG_START> {NUM} to {NUM} <SEG_END>\.")
    return re.compile(
        rf"From <SEG_START> {STEP_WITH_OFFSETS}( <RETHINK> {STEP_WITH_OFFSETS}){{{k}}} <SEG_END>\."
    )


@st.composite
def cases(draw):
    """A ground truth (seconds -> indices), a duration, a schedule and an rng key."""
    duration = draw(st.floats(0.5, 900.0, allow_nan=False))
    a = draw(st.floats(0.0, 1.0))
    b = draw(st.floats(0.0, 1.0))
    start, end = sorted((a * duration, b * duration))
    gt = (UNIFORM99.to_index(start, duration), UNIFORM99.to_index(end, duration))
    schedule = RefineSchedule(
        steps=draw(st.integers(0, 5)),
        noise_std=tuple(draw(st.lists(st.floats(0.0, 30.0), min_size=1, max_size=5))),
        relative=draw(st.booleans()),
        contain_gt=draw(st.booleans()),
    )
    if schedule.relative:  # stds as fractions of the duration: keep them in a plausible range
        schedule = RefineSchedule(
            schedule.steps, tuple(s / 30.0 for s in schedule.noise_std), True, schedule.contain_gt
        )
    key = (draw(st.integers(0, 2**31)), draw(st.integers(0, 1000)), draw(st.integers(0, 10**6)))
    return gt, duration, schedule, key


@settings(max_examples=300, deadline=None)
@given(cases())
def test_target_properties(case):
    gt, duration, schedule, key = case
    steps = make_target_rounds(gt, duration, schedule, sample_rng(*key))
    k = schedule.steps

    assert len(steps) == k + 1
    for step in steps:
        assert 0 <= step.start <= step.end <= MAX_INDEX
        assert step.refined == gt  # coarse + offset is exactly the ground truth
        assert -MAX_INDEX <= step.offset_start <= MAX_INDEX and -MAX_INDEX <= step.offset_end <= MAX_INDEX
        if schedule.contain_gt:
            assert step.start <= gt[0] and step.end >= gt[1]
    if k == 0:
        assert steps == [RefineRound(*gt)]
    if schedule.stds()[-1] == 0 and k > 0:
        assert (steps[-1].start, steps[-1].end) == gt

    text = format_answer(steps, with_offsets=k > 0)
    assert answer_pattern(k).fullmatch(text), text
    assert text.count("<RETHINK>") == k and text.count("<OFFSET>") == (k + 1 if k else 0)


@settings(max_examples=100, deadline=None)
@given(cases())
def test_same_key_same_target(case):
    gt, duration, schedule, key = case
    first = make_target_rounds(gt, duration, schedule, sample_rng(*key))
    again = make_target_rounds(gt, duration, schedule, sample_rng(*key))
    assert first == again


def test_different_epochs_give_different_noise():
    schedule = RefineSchedule(steps=3)
    targets = {tuple(make_target_rounds((30, 60), 30.0, schedule, sample_rng(0, e, 7))) for e in range(10)}
    assert len(targets) >= 9
    by_index = {tuple(make_target_rounds((30, 60), 30.0, schedule, sample_rng(0, 0, i))) for i in range(10)}
    assert len(by_index) >= 9
    by_seed = {tuple(make_target_rounds((30, 60), 30.0, schedule, sample_rng(s, 0, 0))) for s in range(10)}
    assert len(by_seed) >= 9


def test_collator_targets_follow_seed_epoch_index():
    collator = helpers.collator(refine_steps=3, seed=5)
    record = GroundingRecord("q", "v", "a person opens the door", 30.0, 6.0, 18.0)
    assert collator.target_rounds(record, 2, 3) == collator.target_rounds(record, 2, 3)
    assert collator.target_rounds(record, 2, 3) == make_target_rounds(
        (UNIFORM99.to_index(6.0, 30.0), UNIFORM99.to_index(18.0, 30.0)),
        30.0,
        RefineSchedule(steps=3),
        sample_rng(5, 2, 3),
    )
    per_epoch = {tuple(collator.target_rounds(record, e, 3)) for e in range(8)}
    assert len(per_epoch) >= 7


def test_direct_answer_has_no_offsets():
    steps = make_target_rounds((12, 80), 20.0, RefineSchedule(steps=0), sample_rng(0, 0, 0))
    assert steps == [RefineRound(12, 80, 0, 0)]
    assert format_answer(steps, with_offsets=False) == "From <SEG_START> 12 to 80 <SEG_END>."


def test_format_pads_to_two_digits_and_signs_offsets():
    steps = [RefineRound(3, 95, 2, -9), RefineRound(5, 86, 0, 0)]
    assert (
        format_answer(steps, with_offsets=True)
        == "From <SEG_START> 03 to 95 <OFFSET> +02 and -09 <RETHINK> 05 to 86 <OFFSET> +00 and +00 <SEG_END>."
    )


@pytest.mark.parametrize("gt", [(0, 99), (0, 4), (95, 99), (0, 0), (99, 99)])
def test_clipping_at_both_ends(gt):
    schedule = RefineSchedule(steps=3, noise_std=(40.0, 30.0, 20.0, 10.0))
    for i in range(50):
        for step in make_target_rounds(gt, 10.0, schedule, sample_rng(1, 0, i)):
            assert 0 <= step.start <= gt[0] and gt[1] <= step.end <= MAX_INDEX
            assert step.refined == gt
    if gt == (0, 99):
        assert make_target_rounds(gt, 10.0, schedule, sample_rng(1, 0, 0)) == [RefineRound(0, 99)] * 4


def test_clipping_without_containment_keeps_segments_valid():
    schedule = RefineSchedule(steps=2, noise_std=(60.0,), contain_gt=False)
    seen_clipped = set()
    for i in range(200):
        for step in make_target_rounds((2, 97), 10.0, schedule, sample_rng(2, 0, i)):
            assert 0 <= step.start <= step.end <= MAX_INDEX
            assert step.refined == (2, 97)
            seen_clipped |= {step.start == 0, step.end == MAX_INDEX}
    assert True in seen_clipped


def test_very_short_video_noise_saturates():
    # 5 s of noise on a 1 s video is ~500 frame indices: almost every coarse segment is the full video.
    schedule = RefineSchedule(steps=3)
    firsts = [make_target_rounds((40, 60), 1.0, schedule, sample_rng(0, 0, i))[0] for i in range(100)]
    full = sum((s.start, s.end) == (0, MAX_INDEX) for s in firsts)
    assert full >= 80
    assert all(s.refined == (40, 60) for s in firsts)


def test_very_long_video_noise_is_small():
    # 5 s of noise on a 600 s video is ~0.8 frame indices.
    schedule = RefineSchedule(steps=3)
    offsets = [
        abs(o)
        for i in range(200)
        for s in make_target_rounds((40, 60), 600.0, schedule, sample_rng(0, 0, i))
        for o in (s.offset_start, s.offset_end)
    ]
    assert max(offsets) <= 5
    assert 0.2 < np.mean(offsets) < 1.5


def test_schedule_interpolation():
    base = (5.0, 3.0, 1.0, 0.0)
    assert RefineSchedule(steps=3, noise_std=base).stds() == [5.0, 3.0, 1.0, 0.0]
    assert RefineSchedule(steps=1, noise_std=base).stds() == pytest.approx([5.0, 0.0])
    assert RefineSchedule(steps=2, noise_std=base).stds() == pytest.approx([5.0, 2.0, 0.0])
    assert RefineSchedule(steps=5, noise_std=base).stds() == pytest.approx([5.0, 3.8, 2.6, 1.4, 0.6, 0.0])
    assert RefineSchedule(steps=3, noise_std=(2.0,)).stds() == pytest.approx([2.0] * 4)
    assert RefineSchedule(steps=0, noise_std=base).stds() == pytest.approx([5.0])


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 8), st.lists(st.floats(0.0, 50.0), min_size=1, max_size=8))
def test_schedule_stds_length_and_ends(steps, stds):
    values = RefineSchedule(steps=steps, noise_std=tuple(stds)).stds()
    assert len(values) == steps + 1
    assert values[0] == pytest.approx(stds[0])
    if steps > 0:
        assert values[-1] == pytest.approx(stds[-1])
    assert min(stds) - 1e-9 <= min(values) and max(values) <= max(stds) + 1e-9


def test_relative_mode_ignores_the_duration():
    relative = RefineSchedule(steps=3, noise_std=(0.2, 0.1, 0.05, 0.0), relative=True)
    a = make_target_rounds((30, 60), 10.0, relative, sample_rng(0, 0, 1))
    b = make_target_rounds((30, 60), 500.0, relative, sample_rng(0, 0, 1))
    assert a == b
    assert a[0] != RefineRound(30, 60, 0, 0)  # 0.2 x 99 indices of noise: the coarse segment moved

    absolute = RefineSchedule(steps=3, noise_std=(10.0, 5.0, 2.5, 0.0))
    assert make_target_rounds((30, 60), 50.0, absolute, sample_rng(0, 0, 1)) == a  # 10 s of 50 s = 0.2
    assert make_target_rounds((30, 60), 20.0, absolute, sample_rng(0, 0, 1)) != a


def test_first_coarse_replaces_the_first_segment():
    steps = make_target_rounds((30, 60), 30.0, RefineSchedule(steps=2), sample_rng(0, 0, 0), (70, 90))
    assert (steps[0].start, steps[0].end) == (70, 90)
    assert all(step.refined == (30, 60) for step in steps)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"steps": -1},
        {"noise_std": ()},
        {"noise_std": (1.0, -0.5)},
        {"steps": 2, "noise_std": (-1.0,)},
    ],
)
def test_invalid_schedules_raise(kwargs):
    with pytest.raises(ValueError):
        RefineSchedule(**kwargs)


@settings(max_examples=200, deadline=None)
@given(cases(), st.lists(st.floats(0.0, 20.0), min_size=1, max_size=4))
def test_residual_offsets_stop_short_of_the_truth_but_the_last_is_exact(case, residual):
    gt, duration, schedule, key = case
    schedule = RefineSchedule(schedule.steps, schedule.noise_std, False, schedule.contain_gt, tuple(residual))
    steps = make_target_rounds(gt, duration, schedule, sample_rng(*key))

    assert len(steps) == schedule.steps + 1
    assert steps[-1].refined == gt
    for step in steps:
        start, end = step.refined
        assert 0 <= start <= end <= MAX_INDEX  # a residual answer is still a segment on the timeline
    assert steps == make_target_rounds(gt, duration, schedule, sample_rng(*key))


def test_residual_error_shrinks_with_its_schedule():
    schedule = RefineSchedule(3, (5.0, 3.0, 1.0, 0.0), residual_std=(6.0, 0.0))
    assert schedule.residual_stds() == pytest.approx([6.0, 4.0, 2.0, 0.0])  # interpolated
    assert RefineSchedule(1, residual_std=(6.0, 6.0)).residual_stds() == [6.0, 0.0]  # the last is exact
    gt = (30, 60)
    errors = np.array(
        [
            [abs(s.refined[0] - gt[0]) for s in make_target_rounds(gt, 99.0, schedule, sample_rng(0, 0, i))]
            for i in range(2000)
        ]
    )
    mean = errors.mean(0)  # one second is one index at 99 s: E|N(0, s)| = 0.8 s
    assert mean[0] == pytest.approx(0.8 * 6.0, rel=0.1)
    assert mean[1] == pytest.approx(0.8 * 4.0, rel=0.1)
    assert mean[2] == pytest.approx(0.8 * 2.0, rel=0.1)
    assert mean[3] == 0


def test_no_residual_leaves_the_reference_targets_unchanged():
    plain = RefineSchedule(3)
    explicit = RefineSchedule(3, residual_std=(0.0,))
    for i in range(20):
        assert make_target_rounds((10, 40), 30.0, plain, sample_rng(1, 2, i)) == make_target_rounds(
            (10, 40), 30.0, explicit, sample_rng(1, 2, i)
        )
    with pytest.raises(ValueError, match="residual_std"):
        RefineSchedule(3, residual_std=(-1.0,))


def on_policy_share(fraction: float, seed: int = 0, epoch: int = 0, n: int = 400) -> tuple[float, set[int]]:
    """Share of ``n`` samples whose first coarse segment is the cached guess, and their indices."""
    collator = helpers.collator(refine_steps=3, seed=seed)
    collator.coarse_lookup, collator.on_policy_fraction = {"q": (70, 90)}.get, fraction
    record = GroundingRecord("q", "v", "a person opens the door", 30.0, 6.0, 18.0)  # gt (20, 59)
    own = {i for i in range(n) if collator.target_rounds(record, epoch, i)[0].start == 70}
    return len(own) / n, own


def test_on_policy_fraction_is_a_seeded_draw_per_sample():
    assert on_policy_share(0.0)[0] == 0.0
    assert on_policy_share(1.0)[0] == 1.0
    share, own = on_policy_share(0.5)
    assert 0.42 < share < 0.58 and on_policy_share(0.5)[1] == own
    assert 0.05 < on_policy_share(0.1)[0] < 0.15
    assert on_policy_share(0.5, epoch=1)[1] != own and on_policy_share(0.5, seed=1)[1] != own
