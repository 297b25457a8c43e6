"""Charades-STA, ActivityNet Captions and JSONL files as DataSources: parsed annotations + a feature store.

Every split's records are checked against the store once (``strict`` raises on the first bad video,
otherwise its queries are skipped and counted), and the coverage (which also counts the queries the
quirk policy dropped) is kept for the metrics. A split with no usable query raises EmptySplitError.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from datamodules.action_timelines import Timeline, read_timelines
from datamodules.action_trace import ActionTraceFeatureStore, ActionTraceSpec
from datamodules.activitynet import load_activitynet
from datamodules.charades_sta import CSV_NAMES, load_charades_sta
from datamodules.coverage import CoverageReport, check_coverage, with_annotation_drops
from datamodules.feature_stores import build_feature_store
from datamodules.jsonl import FIELDS, load_jsonl
from datamodules.query_control import apply_query_control
from datamodules.quirks import QuirkPolicy, QuirkReport
from datamodules.records import EmptySplitError, FeatureStore, GroundingRecord

log = logging.getLogger(__name__)
STORED_FEATURES = ("folder", "packed")  # read from data.source.feature_path; the others are made here
Loader = Callable[..., tuple[list[GroundingRecord], QuirkReport]]
LOADERS: dict[str, Loader] = {
    "charades_sta": load_charades_sta,
    "activitynet": load_activitynet,
    "jsonl": load_jsonl,
}


@dataclass(frozen=True)
class AnnotationSpec:
    """Where an annotated dataset's files are and how its features are read.

    ``splits`` maps train/val/test to the dataset's own split names. ``features``: synthetic (signatures
    of each query's words inside its segment, no download) | folder ({video_id}.npy/.npz/.pt under
    ``feature_path``) | packed (a store written by timerefine-pack-features) | action_trace
    (Charades-STA only: :class:`CharadesSpec`). ``strict=False`` skips
    (and counts) queries whose features are missing or bad. ``annotation_files`` replaces a split's
    file, e.g. ``{train: charades_sta_train.vslnet_fixed.txt}``. ``queries``: annotated, or a leak
    check, ``empty`` or ``shuffled`` (datamodules/query_control.py).
    """

    root: str
    splits: dict[str, str]
    features: str = "synthetic"
    feature_path: str | None = None
    num_frames: int = 100
    feature_dim: int = 768
    strict: bool = True
    synthetic_noise: float = 0.5
    seed: int = 0
    quirks: QuirkPolicy = field(default_factory=QuirkPolicy)
    annotation_files: dict[str, str] = field(default_factory=dict)
    queries: str = "annotated"


class AnnotationSource:
    """``splits`` maps train/val/test to the dataset's own split names (e.g. val -> val_1)."""

    def __init__(
        self,
        name: str,
        root: str,
        splits: dict[str, str],
        features: str = "synthetic",
        feature_path: str | None = None,
        num_frames: int = 100,
        feature_dim: int = 768,
        strict: bool = True,
        synthetic_noise: float = 0.5,
        seed: int = 0,
        quirks: dict | None = None,
        annotation_files: dict[str, str] | None = None,
        queries: str = "annotated",
    ) -> None:
        if name not in LOADERS:
            raise ValueError(f"unknown annotated dataset {name!r}; choose from {sorted(LOADERS)}")
        if not Path(root).is_dir():
            raise FileNotFoundError(
                f"data.source.root={root}: no such directory (the {name} annotation files go there)"
            )
        if features in STORED_FEATURES and not feature_path:
            raise ValueError(f"data.source.features={features} needs data.source.feature_path")
        self.name, self.root, self.splits = name, root, dict(splits)
        self.features, self.feature_path = features, feature_path
        self.num_frames, self.feature_dim, self.strict = num_frames, feature_dim, strict
        self.synthetic_noise, self.seed = synthetic_noise, seed
        self.policy = QuirkPolicy(**(quirks or {}))
        self.annotation_files = annotation_files or {}
        self.queries = queries
        self.loader_options: dict[str, object] = {}  # more keyword arguments of the loader
        self._parsed: dict[str, tuple[list[GroundingRecord], QuirkReport]] = {}
        self._usable: dict[str, list[GroundingRecord]] = {}
        self.coverage: dict[str, CoverageReport] = {}
        self._store: FeatureStore | None = None

    def _parse(self, split: str) -> tuple[list[GroundingRecord], QuirkReport]:
        own = self.splits[split]
        if own not in self._parsed:
            kwargs = {"annotation_file": self.annotation_files[own]} if own in self.annotation_files else {}
            self._parsed[own] = LOADERS[self.name](
                self.root, own, self.policy, **kwargs, **self.loader_options
            )
        return self._parsed[own]

    def store(self, split: str) -> FeatureStore:
        if self._store is None:
            self._store = self._build_store()
        return self._store

    def _build_store(self) -> FeatureStore:
        if self.features == "synthetic":
            every = [r for s in self.splits for r in self._parse(s)[0]]
            return build_feature_store(
                "synthetic",
                records=every,
                num_frames=self.num_frames,
                feature_dim=self.feature_dim,
                seed=self.seed,
                noise=self.synthetic_noise,
            )
        location = {"folder": "root", "packed": "path"}.get(self.features, "root")
        return build_feature_store(
            self.features,
            **{location: self.feature_path},
            num_frames=self.num_frames,
            feature_dim=self.feature_dim,
        )

    def records(self, split: str) -> list[GroundingRecord]:
        if split not in self._usable:
            parsed, quirks = self._parse(split)
            usable, features = check_coverage(parsed, self.store(split), strict=self.strict)
            report = with_annotation_drops(features, quirks)
            log.info("%s %s (%s): %s", self.name, split, self.splits[split], report.summary())
            if not usable:
                raise EmptySplitError(f"{self.name} {split} ({quirks.source}): {report.none_usable()}")
            usable = apply_query_control(usable, self.queries, split, self.seed)
            self._usable[split], self.coverage[split] = usable, report
        return self._usable[split]


@dataclass(frozen=True)
class CharadesSpec(AnnotationSpec):
    """Charades-STA. ``features=action_trace`` makes each video's frames from its real action
    timeline (``Charades_v1_*.csv``) as a simulated action detector sees it, degraded as
    ``action_trace`` says (datamodules/action_trace.py); the query never enters them."""

    action_trace: ActionTraceSpec = field(default_factory=ActionTraceSpec)


class CharadesSource(AnnotationSource):
    """Charades-STA, with its videos' action timelines (the query-free baseline reads them)."""

    def __init__(self, action_trace: dict | None = None, **common: object) -> None:
        super().__init__("charades_sta", **common)  # type: ignore[arg-type]
        self.action_trace = ActionTraceSpec(**(action_trace or {}))

    @cached_property
    def timelines(self) -> dict[str, Timeline]:
        """Video id -> its annotated actions, from the Charades CSVs in ``root``."""
        return read_timelines(
            Path(self.root) / name for name in CSV_NAMES if (Path(self.root) / name).is_file()
        )

    def _build_store(self) -> FeatureStore:
        if self.features != "action_trace":
            return super()._build_store()
        return ActionTraceFeatureStore(
            self.timelines, self.num_frames, self.feature_dim, self.seed, self.action_trace
        )


def activitynet_source(**kwargs: object) -> AnnotationSource:
    return AnnotationSource("activitynet", **kwargs)  # type: ignore[arg-type]


@dataclass(frozen=True)
class JsonlSpec(AnnotationSpec):
    """A JSONL dataset (datamodules/jsonl.py), ``{split}.jsonl`` in ``root`` unless ``annotation_files``
    names the file. ``keys`` maps each field to its key in the files. ``multi_window`` scores a query
    with several windows against the best-matching one (``best``, Lighthouse) or their union
    (``union``, UniTime); its targets use :func:`timerefine.metrics.windows.target_window`."""

    keys: dict[str, str] = field(default_factory=lambda: {name: name for name in FIELDS})
    multi_window: str = "best"


class JsonlSource(AnnotationSource):
    def __init__(
        self, keys: dict[str, str] | None = None, multi_window: str = "best", **common: object
    ) -> None:
        super().__init__("jsonl", **common)  # type: ignore[arg-type]
        self.loader_options = {"keys": keys, "multi_window": multi_window}
