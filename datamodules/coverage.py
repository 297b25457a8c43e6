"""Which queries are usable: check each video's features once, keep or skip its queries, and add
the queries the annotation quirk policy dropped, so a split's coverage counts every query read."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from datamodules.feature_stores import reason_kind
from datamodules.quirks import QuirkReport
from grounding.records import FeatureError, FeatureStore, GroundingRecord

log = logging.getLogger(__name__)


@dataclass
class CoverageReport:
    """Queries in total and usable; skipped queries counted by error kind, with one example each."""

    total: int
    usable: int
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return self.usable / self.total if self.total else 0.0

    def summary(self) -> str:
        skipped = ", ".join(f"{kind}: {n}" for kind, n in sorted(self.skipped_by_reason.items()))
        line = f"coverage: {self.usable}/{self.total} queries ({self.fraction:.1%})"
        return f"{line}; skipped {skipped}; e.g. {'; '.join(self.examples.values())}" if skipped else line

    def none_usable(self) -> str:
        """Why no query is usable, e.g. ``0 of 12 queries usable: 12 skipped (missing: 12), e.g. ...``."""
        if not self.total:
            return "the annotations hold no query"
        kinds = sorted(self.skipped_by_reason.items(), key=lambda item: -item[1])
        counts = ", ".join(f"{kind}: {n}" for kind, n in kinds)
        skipped = f"{self.total - self.usable} skipped ({counts}), e.g. {self.examples[kinds[0][0]]}"
        return f"{self.usable} of {self.total} queries usable: {skipped}"


def with_annotation_drops(features: CoverageReport, quirks: QuirkReport) -> CoverageReport:
    """The feature coverage of the parsed records, plus the queries the quirk policy dropped."""
    dropped = quirks.dropped_by_kind()
    return CoverageReport(
        features.total + sum(dropped.values()),
        features.usable,
        {**features.skipped_by_reason, **dropped},
        {**features.examples, **{kind: quirks.examples[kind][0] for kind in dropped}},
    )


def check_coverage(
    records: Sequence[GroundingRecord], store: FeatureStore, strict: bool = False
) -> tuple[list[GroundingRecord], CoverageReport]:
    """Load every distinct video once; return the records whose video loads, and the report.

    With ``strict`` the first :class:`FeatureError` is raised instead of skipping its queries.
    """
    errors: dict[str, FeatureError | None] = {}
    for video_id in dict.fromkeys(r.video_id for r in records):
        try:
            store.load(video_id)
            errors[video_id] = None
        except FeatureError as err:
            if strict:
                raise
            errors[video_id] = err
    usable = [r for r in records if errors[r.video_id] is None]
    skipped = Counter(reason_kind(errors[r.video_id]) for r in records if errors[r.video_id] is not None)
    examples = {reason_kind(e): str(e) for e in reversed(errors.values()) if e is not None}
    report = CoverageReport(len(records), len(usable), dict(skipped), examples)
    (log.warning if skipped else log.info)(report.summary())
    return usable, report
