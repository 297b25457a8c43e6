"""Timeline conventions (``data.timeline``) against hand-computed values, and their use by targets,
predictions, the aux head, the temporal digits, frame placement and the ceiling they put on mIoU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules.builtin import BuiltinSpec, builtin_records
from grounding.answer_format.predictions import predict, seconds
from grounding.answer_format.targets import RefineSchedule, draw_target_rounds, sample_rng
from grounding.answer_format.timeline import (
    TIMELINES,
    UNIFORM99,
    VTIMELLM100,
    frame_times,
    timeline_named,
)
from grounding.metrics.ceiling import timeline_ceiling
from grounding.records import GroundingRecord
from lightning_modules.aux_head import AuxHead, distance_loss


@pytest.mark.parametrize(
    ("timeline", "seconds_", "duration", "index"),
    [
        (UNIFORM99, 10.0, 30.0, 33),  # 10 / 30 x 99 = 33
        (UNIFORM99, 30.0, 30.0, 99),
        (UNIFORM99, 0.0, 30.0, 0),
        (VTIMELLM100, 10.0, 30.0, 33),  # 33.33
        (VTIMELLM100, 20.0, 30.0, 67),  # 66.67
        (VTIMELLM100, 29.9, 30.0, 99),  # round(99.67) = 100, capped at 99
        (VTIMELLM100, 30.0, 30.0, 99),
        (VTIMELLM100, 0.149, 1.0, 15),  # 14.9
    ],
)
def test_to_index(timeline, seconds_, duration, index):
    assert timeline.to_index(seconds_, duration) == index


@pytest.mark.parametrize(
    ("timeline", "index", "duration", "expected"),
    [
        (UNIFORM99, 33, 30.0, 10.0),
        (UNIFORM99, 99, 30.0, 30.0),
        (VTIMELLM100, 33, 30.0, 9.9),
        (VTIMELLM100, 99, 30.0, 29.7),  # the last index is 0.99 of the video
        (VTIMELLM100, 50, 7.0, 3.5),
        (VTIMELLM100, -3, 7.0, 0.0),  # clipped
        (VTIMELLM100, 100.0, 30.0, 30.0),  # the aux head's end of the video (before: clipped to 29.7)
        (VTIMELLM100, 104.0, 30.0, 30.0),
    ],
)
def test_to_seconds(timeline, index, duration, expected):
    assert timeline.to_seconds(index, duration) == pytest.approx(expected)


def test_the_aux_head_can_answer_up_to_the_end_of_the_video_on_either_timeline():
    """The aux head regresses fractions of the duration; the text's last index is 0.99 of it under
    vtimellm100, but the head's answer was clipped there too, capping every query that ends the video."""
    for timeline in (UNIFORM99, VTIMELLM100):
        prediction = predict("no answer", 2, "aux", (0.5, 1.0), timeline)
        assert seconds(prediction.final, 30.0, timeline) == pytest.approx((15.0, 30.0))


def test_offset_steps_round_each_length_on_its_own():
    assert VTIMELLM100.to_steps(0.1, 30.0) == 0  # 0.33 steps
    assert VTIMELLM100.to_steps(0.2, 30.0) == 1  # 0.67
    assert VTIMELLM100.to_steps(45.0, 30.0) == 99  # capped: two digits
    assert UNIFORM99.to_steps(10.0, 30.0) == 33


def test_frame_indices_of_the_video_tokens():
    """Frame k of n shows k / (n - 1) of the video; its index on each timeline."""
    assert [UNIFORM99.frame_index(k, 100) for k in (0, 1, 50, 98, 99)] == [0, 1, 50, 98, 99]
    assert [VTIMELLM100.frame_index(k, 100) for k in (0, 1, 50, 98, 99)] == [0, 1, 51, 99, 99]
    assert [UNIFORM99.frame_index(k, 3) for k in range(3)] == [0, 50, 99]  # 49.5 rounds to even


def test_frames_include_both_ends():
    np.testing.assert_allclose(frame_times(5, 8.0), [0.0, 2.0, 4.0, 6.0, 8.0])


def test_timelines_by_name():
    assert timeline_named("vtimellm100") is VTIMELLM100 and sorted(TIMELINES) == ["uniform99", "vtimellm100"]
    with pytest.raises(ValueError, match="choose from uniform99, vtimellm100"):
        timeline_named("centres")


def test_predictions_read_indices_on_the_timeline():
    text = "From <SEG_START> 10 to 50 <SEG_END>."
    prediction = predict(text, 1, "last", None, VTIMELLM100)
    assert seconds(prediction.final, 20.0, VTIMELLM100) == pytest.approx((2.0, 10.0))
    assert seconds(prediction.final, 19.8, UNIFORM99) == pytest.approx((2.0, 10.0))
    # the aux head's normalized output lands on the same fractions of the video
    aux = predict(text, 1, "aux", (0.5, 0.25), VTIMELLM100)
    assert aux.final == (25.0, 50.0) and seconds(aux.final, 20.0, VTIMELLM100) == pytest.approx((5.0, 10.0))


def test_index_targets_use_the_timeline():
    """The ground truth 10-20 s of 30 s: 33-66 on uniform99, 33-67 on vtimellm100 (K = 0: no noise)."""
    direct = RefineSchedule(steps=0)
    for timeline, expected in ((UNIFORM99, (33, 66)), (VTIMELLM100, (33, 67))):
        (round_,) = draw_target_rounds((10.0, 20.0), 30.0, direct, timeline, sample_rng(0, 0, 0))
        assert (round_.start, round_.end) == expected


def test_distance_bins_sit_on_the_timeline():
    """Bin i of the distance loss is i / span of the video: peaked logits at bins 50 and 98 are
    exact on their own timeline and off on the other one."""
    logits = torch.full((1, 2, 100), -1e4)
    logits[0, 0, 50] = logits[0, 1, 98] = 1e4
    for timeline, other in ((UNIFORM99, VTIMELLM100), (VTIMELLM100, UNIFORM99)):
        target = torch.tensor([[50 / timeline.span, 98 / timeline.span]])
        assert float(distance_loss(logits, target, timeline.span)) == pytest.approx(0.0, abs=1e-6)
        assert float(distance_loss(logits, target, other.span)) > 1e-2
        assert AuxHead(8, "linear", "distance", timeline=timeline).span == timeline.span


def test_a_perfect_index_prediction_does_not_reach_100():
    """GT 10-20 s of 30 s: uniform99 writes 33-66 and reads back 10-20 s exactly; vtimellm100 writes
    33-67 and reads back 9.9-20.1 s, IoU 10 / 10.2."""
    record = GroundingRecord("q", "v", "someone opens the door", 30.0, 10.0, 20.0)
    assert timeline_ceiling([record], UNIFORM99)["mIoU"] == pytest.approx(100.0)
    assert timeline_ceiling([record], VTIMELLM100)["mIoU"] == pytest.approx(100 * 10 / 10.2)
    builtin = builtin_records(BuiltinSpec(num_test=200), "test")
    for timeline in TIMELINES.values():
        ceiling = timeline_ceiling(builtin, timeline)
        assert 97 < ceiling["mIoU"] < 100 and ceiling["R1@0.7"] == 100.0
