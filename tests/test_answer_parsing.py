"""Parsing generated answers: round trips, truncation, garbage, and the final-segment choice."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grounding.answer_format.layout import format_answer, parse_answer, predicted_segments
from grounding.answer_format.predictions import predict, seconds
from grounding.answer_format.targets import RefineRound, RefineSchedule, make_target_rounds, sample_rng


def num_segments(k: int) -> int:
    return RefineSchedule(steps=k).num_segments


@st.composite
def targets(draw, k=None):
    k = draw(st.integers(0, 3)) if k is None else k
    start = draw(st.integers(0, 99))
    end = draw(st.integers(start, 99))
    schedule = RefineSchedule(steps=k, noise_std=(30.0, 10.0, 3.0, 0.0), contain_gt=draw(st.booleans()))
    steps = make_target_rounds((start, end), 30.0, schedule, sample_rng(draw(st.integers(0, 10**6)), 0, 0))
    return k, steps


@settings(max_examples=200, deadline=None)
@given(targets())
def test_round_trip(target):
    k, steps = target
    text = format_answer(steps, with_offsets=k > 0)
    assert parse_answer(text) == steps


@settings(max_examples=200, deadline=None)
@given(targets())
def test_step_segments_follow_the_refinement_path(target):
    k, steps = target
    segments = predicted_segments(parse_answer(format_answer(steps, with_offsets=k > 0)), num_segments(k))
    gt = steps[0].refined
    if k == 0:
        assert segments == [gt]
        return
    assert len(segments) == k + 2
    assert segments[0] == (steps[0].start, steps[0].end)
    assert all(segment == gt for segment in segments[1:])


def test_step_segments_order_and_clip():
    steps = [RefineRound(60, 20, 0, 0), RefineRound(90, 95, 30, 10)]
    assert predicted_segments(steps, num_segments(0)) == [(20, 60)]
    assert predicted_segments(steps, num_segments(1)) == [(20, 60), (20, 60), (99, 99)]
    assert predicted_segments([], num_segments(3)) == []
    # More parsed steps than the schedule has: only the first K+1 refinements count.
    assert len(predicted_segments([RefineRound(1, 2)] * 6, num_segments(2))) == 4


def is_prefix(parsed: list[RefineRound], steps: list[RefineRound]) -> bool:
    return parsed == steps[: len(parsed)]


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_truncated_generations_keep_only_complete_steps(k):
    steps = make_target_rounds((23, 68), 30.0, RefineSchedule(steps=k), sample_rng(3, 0, 1))
    text = format_answer(steps, with_offsets=k > 0)
    for cut in range(len(text) + 1):
        parsed = parse_answer(text[:cut])
        assert is_prefix(parsed, steps), (text[:cut], parsed)
    assert parse_answer(text) == steps


@settings(max_examples=100, deadline=None)
@given(targets(), st.data())
def test_truncation_never_invents_steps(target, data):
    k, steps = target
    text = format_answer(steps, with_offsets=k > 0)
    cut = data.draw(st.integers(0, len(text)))
    assert is_prefix(parse_answer(text[:cut]), steps)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello world",
        "From <SEG_START> <SEG_END>.",
        "From <SEG_START> ab to cd <SEG_END>.",
        "From <SEG_START> 12 until 34 <SEG_END>.",
        "From <SEG_START> 123 to 45 <SEG_END>.",
        "From <SEG_START> 12 to 345 <SEG_END>.",
        "From <SEG_START> to 34 <SEG_END>.",
        "<SEG_END> 12 to 34",
        "From <SEG_START> -12 to 34 <SEG_END>.",
        "\x00\x01 <RETHINK> <OFFSET> ++ -- 99",
    ],
)
def test_garbage_parses_to_nothing(text):
    assert parse_answer(text) == []
    prediction = predict(text, num_segments(3), "last", None)
    assert prediction.final is None and prediction.segments == []


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("0123456789 +-toand<>SEG_STARTENDOFFSETRHINK.\n")), max_size=80))
def test_arbitrary_text_never_raises(text):
    for step in parse_answer(text):
        assert 0 <= step.start <= 99 and 0 <= step.end <= 99
        assert -99 <= step.offset_start <= 99 and -99 <= step.offset_end <= 99
    predict(text, num_segments(2), "mean", (0.1, 0.2))


def test_missing_seg_start_reads_the_whole_text():
    assert parse_answer("36 to 68 <SEG_END>.") == [RefineRound(36, 68)]
    # The "From" prefix without the marker: either nothing or the right step, never a wrong one.
    assert parse_answer("From 36 to 68 <SEG_END>.") in ([], [RefineRound(36, 68)])


def test_extra_whitespace():
    text = "From <SEG_START>   36\tto  68 \n<OFFSET>  + 01  and   -04  <RETHINK>  37 to 65 <OFFSET> +00 and +00   <SEG_END> ."
    assert parse_answer(text) == [RefineRound(36, 68, 1, -4), RefineRound(37, 65, 0, 0)]
    assert parse_answer("From <SEG_START>36 to 68<SEG_END>.") == [RefineRound(36, 68)]


def test_single_digit_numbers():
    assert parse_answer("From <SEG_START> 5 to 9 <SEG_END>.") == [RefineRound(5, 9)]
    assert parse_answer("From <SEG_START> 5 to 40 <OFFSET> +1 and -4 <SEG_END>.") == [
        RefineRound(5, 40, 1, -4)
    ]


def test_text_after_seg_end_is_ignored():
    assert parse_answer("From <SEG_START> 10 to 20 <SEG_END>. 30 to 40 <RETHINK> 50 to 60") == [
        RefineRound(10, 20)
    ]


ANSWER = "From <SEG_START> 20 to 70 <OFFSET> +05 and -10 <RETHINK> 24 to 62 <OFFSET> +01 and -02 <SEG_END>."


def test_predict_last():
    prediction = predict(ANSWER, num_segments(1), "last", (0.9, 0.1))
    assert prediction.segments == [(20, 70), (25, 60), (25, 60)]
    assert prediction.final == (25, 60)
    assert prediction.text == ANSWER


def test_predict_aux_sorts_and_scales_to_indices():
    prediction = predict(ANSWER, num_segments(1), "aux", (0.5, 0.2))
    assert prediction.final == pytest.approx((0.2 * 99, 0.5 * 99))
    assert prediction.segments == [(20, 70), (25, 60), (25, 60)]  # the text is still parsed
    assert predict(ANSWER, num_segments(1), "aux", None).final == (25, 60)  # no aux output: the text's answer


def test_predict_mean():
    prediction = predict(ANSWER, num_segments(1), "mean", (0.0, 1.0))
    assert prediction.final == pytest.approx(((25 + 0) / 2, (60 + 99) / 2))


@pytest.mark.parametrize("final", ["last", "aux", "mean"])
def test_unparseable_answer_without_aux_has_no_final(final):
    prediction = predict("the model rambles", num_segments(3), final, None)
    assert prediction.final is None and prediction.segments == []


def test_unparseable_answer_with_aux_uses_aux_only_when_asked():
    assert predict("garbage", num_segments(3), "last", (0.1, 0.2)).final is None
    assert predict("garbage", num_segments(3), "aux", (0.1, 0.2)).final == pytest.approx((9.9, 19.8))


def test_predict_rejects_unknown_final():
    with pytest.raises(ValueError, match="final"):
        predict(ANSWER, num_segments(1), "best", None)


def test_seconds():
    assert seconds((0, 99), 30.0) == (0.0, 30.0)
    assert seconds((49.5, 99), 10.0) == pytest.approx((5.0, 10.0))
    start, end = seconds(None, 30.0)
    assert math.isnan(start) and math.isnan(end)
