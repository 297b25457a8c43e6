"""From generated text to the predicted segments (along the refinement path, and final), in seconds."""

from __future__ import annotations

import math
from dataclasses import dataclass

from grounding.answer_format.layout import parse_answer, predicted_segments
from grounding.answer_format.timeline import DEFAULT_TIMELINE, Timeline
from grounding.records import GroundingRecord

AUX_CHOICES = ("aux", "mean")  # the final answers that read the aux head
FINAL_CHOICES = ("last", *AUX_CHOICES)
NAN_SEGMENT = (math.nan, math.nan)


@dataclass
class Prediction:
    text: str
    segments: list[tuple[float, float]]  # frame indices: first coarse segment, then each refined one
    aux: tuple[float, float] | None  # the aux head's segment in frame indices, when it has one
    final_choice: str = "last"

    def choose(self, final: str) -> tuple[float, float] | None:
        """The answer by ``final`` (falling back to what exists); None when nothing parsed."""
        last = self.segments[-1] if self.segments else None
        if final == "last" or self.aux is None:
            return last
        if final == "aux" or last is None:
            return self.aux
        return ((last[0] + self.aux[0]) / 2, (last[1] + self.aux[1]) / 2)

    @property
    def final(self) -> tuple[float, float] | None:
        return self.choose(self.final_choice)


def predict(
    text: str,
    num_segments: int,
    final: str,
    aux_segment: tuple[float, float] | None,
    timeline: Timeline = DEFAULT_TIMELINE,
) -> Prediction:
    """Parse ``text`` into at most ``num_segments`` segments; ``aux_segment`` is the aux head's
    normalized segment (used by ``aux``/``mean``), placed on ``timeline``'s indices."""
    if final not in FINAL_CHOICES:
        raise ValueError(f"unknown final answer {final!r}; choose from {FINAL_CHOICES}")
    aux = None if aux_segment is None else tuple(sorted(x * timeline.span for x in aux_segment))
    return Prediction(text, predicted_segments(parse_answer(text), num_segments), aux, final)


def seconds(
    segment: tuple[float, float] | None, duration: float, timeline: Timeline = DEFAULT_TIMELINE
) -> tuple[float, float]:
    """A frame-index segment in seconds; NaNs for a missing one (scored as IoU 0)."""
    if segment is None:
        return NAN_SEGMENT
    return timeline.to_seconds(segment[0], duration), timeline.to_seconds(segment[1], duration)


def prediction_row(
    record: GroundingRecord, prediction: Prediction, iou: float, timeline: Timeline = DEFAULT_TIMELINE
) -> dict:
    """One line of ``predictions/<split>.jsonl``: everything rescoring needs (timerefine-rescore), times
    in unrounded seconds, the final answer also as the frame indices it was read from; ``windows`` and
    their rule ``multi_window`` when the query has several (``gt`` is the target window then, ``iou`` by
    that rule)."""
    final = prediction.final
    return {
        "qid": record.qid,
        "video_id": record.video_id,
        "query": record.query,
        "duration": record.duration,
        "gt": [record.start, record.end],
        **(
            {"windows": [list(w) for w in record.windows], "multi_window": record.multi_window}
            if len(record.windows) > 1
            else {}
        ),
        "pred": None if final is None else list(seconds(final, record.duration, timeline)),
        "pred_index": None if final is None else list(final),
        "iou": round(iou, 5),
        "steps": [list(seconds(segment, record.duration, timeline)) for segment in prediction.segments],
        "text": prediction.text,
    }
