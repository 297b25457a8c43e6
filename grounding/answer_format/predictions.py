"""From generated text to the predicted segments (along the refinement path, and final), in seconds."""

from __future__ import annotations

import math
from dataclasses import dataclass

from grounding.answer_format.layout import parse_answer, predicted_segments
from grounding.answer_format.timeline import DEFAULT_TIMELINE, Timeline
from grounding.records import GroundingRecord

# The final answers that read the aux head: at the last <OFFSET> (aux), or its mean over every
# <OFFSET> (aux_all, as the official evaluation reads it); mean and mean_all average either with the
# last refined segment.
AUX_CHOICES = ("aux", "mean", "aux_all", "mean_all")
FINAL_CHOICES = ("last", *AUX_CHOICES)
NAN_SEGMENT = (math.nan, math.nan)


@dataclass
class Prediction:
    text: str
    segments: list[tuple[float, float]]  # frame indices: first coarse segment, then each refined one
    aux: tuple[float, float] | None  # the aux head's segment in frame indices, when it has one
    final_choice: str = "last"
    aux_all: tuple[float, float] | None = None  # its mean over every <OFFSET>

    def choose(self, final: str) -> tuple[float, float] | None:
        """The answer by ``final`` (falling back to what exists); None when nothing parsed."""
        last = self.segments[-1] if self.segments else None
        aux = self.aux_all if final.endswith("_all") else self.aux
        if final == "last" or aux is None:
            return last
        if final.startswith("aux") or last is None:
            return aux
        return ((last[0] + aux[0]) / 2, (last[1] + aux[1]) / 2)

    @property
    def final(self) -> tuple[float, float] | None:
        return self.choose(self.final_choice)


def predict(
    text: str,
    num_segments: int,
    final: str,
    aux_segment: tuple[float, float] | None,
    timeline: Timeline = DEFAULT_TIMELINE,
    aux_all_segment: tuple[float, float] | None = None,
    order_and_clip: bool = True,
) -> Prediction:
    """Parse ``text`` into at most ``num_segments`` segments; ``aux_segment`` is the aux head's
    normalized segment at the last <OFFSET> (used by ``aux``/``mean``), ``aux_all_segment`` its mean
    over every <OFFSET> (``aux_all``/``mean_all``), placed on ``timeline``'s indices. Segments are
    ordered (and the text's clipped to the indices) unless ``order_and_clip`` is off."""
    if final not in FINAL_CHOICES:
        raise ValueError(f"unknown final answer {final!r}; choose from {FINAL_CHOICES}")

    def indices(segment: tuple[float, float] | None) -> tuple[float, float] | None:
        if segment is None:
            return None
        start, end = (x * timeline.span for x in segment)
        return (min(start, end), max(start, end)) if order_and_clip else (start, end)

    segments = predicted_segments(parse_answer(text), num_segments, order_and_clip)
    return Prediction(text, segments, indices(aux_segment), final, indices(aux_all_segment))


def seconds(
    segment: tuple[float, float] | None,
    duration: float,
    timeline: Timeline = DEFAULT_TIMELINE,
    clip: bool = True,
) -> tuple[float, float]:
    """A frame-index segment in seconds, its ends clipped to the indices (unless ``clip`` is off);
    NaNs for a missing one (scored as IoU 0)."""
    if segment is None:
        return NAN_SEGMENT
    if not clip:
        return segment[0] / timeline.span * duration, segment[1] / timeline.span * duration
    return timeline.to_seconds(segment[0], duration), timeline.to_seconds(segment[1], duration)


def prediction_row(
    record: GroundingRecord,
    prediction: Prediction,
    iou: float,
    timeline: Timeline = DEFAULT_TIMELINE,
    clip: bool = True,
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
        "pred": None if final is None else list(seconds(final, record.duration, timeline, clip)),
        "pred_index": None if final is None else list(final),
        "iou": round(iou, 5),
        "steps": [list(seconds(segment, record.duration, timeline, clip)) for segment in prediction.segments],
        "text": prediction.text,
    }
