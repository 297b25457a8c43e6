"""Charades-STA, ActivityNet Captions and JSONL files as DataSources: parsed annotations + a feature store.

Every split's records are checked against the store once (``strict`` raises on the first bad video,
otherwise its queries are skipped and counted), and the coverage (which also counts the queries the
quirk policy dropped) is kept for the metrics. A split with no usable query raises EmptySplitError.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import MISSING, dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

from datamodules.action_trace import ActionTraceFeatureStore, ActionTraceSpec
from datamodules.activitynet import load_activitynet
from datamodules.charades_sta import CSV_NAMES, load_charades_sta
from datamodules.coverage import CoverageReport, check_coverage, with_annotation_drops
from datamodules.feature_stores import build_feature_store
from datamodules.jsonl import FIELDS, load_jsonl
from datamodules.query_control import QUERY_CONTROLS, apply_query_control
from datamodules.quirks import MissingAnnotationFile, QuirkError, QuirkPolicy, QuirkReport, UnknownSplit
from grounding.action_timelines import Timeline, read_timelines
from grounding.checks import NON_NEGATIVE, Checked, checked, integer, one_of
from grounding.metrics.windows import MULTI_WINDOW_MODES
from grounding.records import EmptySplitError, FeatureStore, GroundingRecord

log = logging.getLogger(__name__)
STORED_FEATURES = ("folder", "packed")  # read from data.source.feature_path; the others are made here
Loader = Callable[..., tuple[list[GroundingRecord], QuirkReport]]
# The datasets read from annotation files: ``data.name`` -> its loader, called as
# ``loader(root, split, policy, [annotation_file=...], **options)``, the options being the fields its
# spec adds to AnnotationSpec. A dataset is its conf/data YAML plus its loader here.
LOADERS: dict[str, Loader] = {
    "charades_sta": load_charades_sta,
    "activitynet": load_activitynet,
    "jsonl": load_jsonl,
}


@dataclass(frozen=True)
class AnnotationSpec(Checked):
    """Where an annotated dataset's files are and how its features are read.

    ``splits`` maps train/val/test to the dataset's own split names. ``features``: synthetic (signatures
    of each query's words inside its segment, no download) | folder ({video_id}.npy/.npz/.pt under
    ``feature_path``) | packed (a store written by timerefine-pack-features) | action_trace
    (Charades-STA only: :class:`CharadesSpec`). ``strict=False`` skips (and counts) queries whose
    features are missing or bad. ``annotation_files`` replaces a split's file, e.g.
    ``{train: charades_sta_train.vslnet_fixed.txt}``. ``queries``: annotated, or a leak check,
    ``empty`` or ``shuffled`` (datamodules/query_control.py).
    """

    root: str
    splits: dict[str, str]
    features: str = checked("synthetic", one_of("synthetic", "action_trace", *STORED_FEATURES))
    feature_path: str | None = None
    num_frames: int = checked(100, integer(1))
    feature_dim: int = checked(768, integer(1))
    strict: bool = True
    synthetic_noise: float = checked(0.5, NON_NEGATIVE)
    seed: int = 0
    quirks: QuirkPolicy = field(default_factory=QuirkPolicy)
    annotation_files: dict[str, str] = field(default_factory=dict)
    queries: str = checked("annotated", one_of(*QUERY_CONTROLS))
    has_action_timelines: ClassVar[bool] = False
    # The knobs only some features read: set under other features, they would change nothing. (Not
    # feature_path: a paper experiment's, kept while smoke-testing it on features=synthetic; the
    # source warns that it is not read.)
    FEATURE_OPTIONS: ClassVar[dict[str, tuple[str, ...]]] = {"synthetic_noise": ("synthetic",)}

    def relations(self) -> Iterator[str]:
        if self.features == "action_trace" and not self.has_action_timelines:
            yield "features=action_trace needs data=charades_sta (the Charades action timelines)"
        if self.features in STORED_FEATURES and not self.feature_path:
            yield f"features={self.features} needs feature_path (the folder or packed store)"
        defaults = {
            f.name: f.default_factory() if f.default is MISSING else f.default
            for f in fields(self)
            if f.name in self.FEATURE_OPTIONS
        }
        for key, readers in self.FEATURE_OPTIONS.items():
            if self.features not in readers and getattr(self, key) != defaults[key]:
                yield (
                    f"{key} is read only with features={' or '.join(readers)}; with "
                    f"features={self.features} it would change nothing"
                )


def key_names(value: Any) -> str | None:
    """A mapping of field names to the non-empty keys that name them in a file."""
    if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value.values()):
        return "must map each field to a non-empty key"
    return None


@dataclass(frozen=True)
class JsonlSpec(AnnotationSpec):
    """A JSONL dataset (datamodules/jsonl.py), ``{split}.jsonl`` in ``root`` unless ``annotation_files``
    names the file. ``keys`` maps each field to its key in the files. ``multi_window`` scores a query
    with several windows against the best-matching one (``best``, Lighthouse) or their union
    (``union``, UniTime); its targets use :func:`grounding.metrics.windows.target_window`."""

    keys: dict[str, str] = checked({name: name for name in FIELDS}, key_names)
    multi_window: str = checked("best", one_of(*MULTI_WINDOW_MODES))


class AnnotationSource:
    """The records of ``spec``'s files, read by ``LOADERS[name]``, and their feature store."""

    STORE_OPTIONS: tuple[str, ...] = ()  # fields of a subclass's spec that its store reads, not its loader

    def __init__(self, name: str, spec: AnnotationSpec) -> None:
        if not Path(spec.root).is_dir():
            raise FileNotFoundError(
                f"data.source.root={spec.root}: no such directory (the {name} annotation files go there)"
            )
        own = {f.name for f in fields(AnnotationSpec)} | set(self.STORE_OPTIONS)
        self.name, self.spec, self.load = name, spec, LOADERS[name]
        self.options = {f.name: getattr(spec, f.name) for f in fields(spec) if f.name not in own}
        self.num_frames, self.feature_dim = spec.num_frames, spec.feature_dim
        self._parsed: dict[str, tuple[list[GroundingRecord], QuirkReport]] = {}
        self._usable: dict[str, list[GroundingRecord]] = {}
        self.coverage: dict[str, CoverageReport] = {}
        self._store: FeatureStore | None = None
        read = sorted(set(spec.splits.values()))
        for key in sorted(set(spec.annotation_files) - set(read)):  # e.g. test=val leaves test's file unread
            log.warning(
                "data.source.annotation_files.%s is read by no split (data.source.splits reads %s): a file "
                "is keyed by the split name that data.source.splits maps to",
                key,
                ", ".join(read),
            )
        if spec.feature_path and spec.features not in STORED_FEATURES:
            log.warning(
                "data.source.feature_path=%s is not read: features=%s are made here (set "
                "data.source.features=%s to read it)",
                spec.feature_path,
                spec.features,
                " or ".join(STORED_FEATURES),
            )

    def _parse(self, split: str) -> tuple[list[GroundingRecord], QuirkReport]:
        own, files = self.spec.splits[split], self.spec.annotation_files
        if own not in self._parsed:
            kwargs = {"annotation_file": files[own]} if own in files else {}
            try:
                self._parsed[own] = self.load(self.spec.root, own, self.spec.quirks, **kwargs, **self.options)
            except UnknownSplit as error:
                raise QuirkError(f"data.source.splits.{split}={own}: {error}") from None
            except MissingAnnotationFile as error:
                key = f"annotation_files.{own}={files[own]}" if own in files else f"splits.{split}={own}"
                raise MissingAnnotationFile(error.path, split, f"data.source.{key}") from None
        return self._parsed[own]

    def annotations(self, split: str) -> list[GroundingRecord]:
        return self._parse(split)[0]

    def store(self, split: str) -> FeatureStore:
        if self._store is None:
            spec = self.spec
            if spec.features == "synthetic":
                # each file once, however many splits read it (val=test; annotation_files.val=<test's file>)
                by_file = {Path(q.source).resolve(): records for records, q in map(self._parse, spec.splits)}
                every = [r for records in by_file.values() for r in records]
                self._store = build_feature_store(
                    "synthetic",
                    records=every,
                    num_frames=self.num_frames,
                    feature_dim=self.feature_dim,
                    seed=spec.seed,
                    noise=spec.synthetic_noise,
                )
            else:
                location = {"folder": "root", "packed": "path"}.get(spec.features, "root")
                self._store = build_feature_store(
                    spec.features,
                    **{location: spec.feature_path},
                    num_frames=self.num_frames,
                    feature_dim=self.feature_dim,
                )
        return self._store

    def records(self, split: str) -> list[GroundingRecord]:
        if split not in self._usable:
            parsed, quirks = self._parse(split)
            usable, features = check_coverage(parsed, self.store(split), strict=self.spec.strict)
            report = with_annotation_drops(features, quirks)
            log.info("%s %s (%s): %s", self.name, split, self.spec.splits[split], report.summary())
            if not usable:
                raise EmptySplitError(f"{self.name} {split} ({quirks.source}): {report.none_usable()}")
            usable = apply_query_control(usable, self.spec.queries, split, self.spec.seed)
            self._usable[split], self.coverage[split] = usable, report
        return self._usable[split]


@dataclass(frozen=True)
class CharadesSpec(AnnotationSpec):
    """Charades-STA. ``features=action_trace`` makes each video's frames from its real action
    timeline (``Charades_v1_*.csv``) as a simulated action detector sees it, degraded as
    ``action_trace`` says (datamodules/action_trace.py); the query never enters them."""

    has_action_timelines: ClassVar[bool] = True
    FEATURE_OPTIONS: ClassVar[dict[str, tuple[str, ...]]] = {
        **AnnotationSpec.FEATURE_OPTIONS,
        "action_trace": ("action_trace",),
    }
    action_trace: ActionTraceSpec = field(default_factory=ActionTraceSpec)


class CharadesSource(AnnotationSource):
    """Charades-STA, with its videos' action timelines (the query-free baseline reads them)."""

    STORE_OPTIONS = ("action_trace",)
    spec: CharadesSpec

    @cached_property
    def timelines(self) -> dict[str, Timeline]:
        """Video id -> its annotated actions, from the Charades CSVs in ``root``."""
        root = Path(self.spec.root)
        try:
            return read_timelines(root / name for name in CSV_NAMES if (root / name).is_file())
        except ValueError as error:  # a line that is not UTF-8 or a malformed actions cell, named file:line
            raise QuirkError(str(error)) from error

    @property
    def baseline_timelines(self) -> dict[str, Timeline] | None:
        """The timelines the query-free best-action baseline reads: only with ``features=action_trace``
        (other features need no actions in the CSVs, only durations)."""
        return self.timelines if self.spec.features == "action_trace" else None

    def store(self, split: str) -> FeatureStore:
        if self.spec.features != "action_trace":
            return super().store(split)
        if self._store is None:
            self._store = ActionTraceFeatureStore(
                self.timelines, self.num_frames, self.feature_dim, self.spec.seed, self.spec.action_trace
            )
        return self._store


def annotation_source(name: str, spec: AnnotationSpec) -> AnnotationSource:
    """The source of dataset ``name`` (Charades-STA's knows its videos' action timelines)."""
    return CharadesSource(name, spec) if isinstance(spec, CharadesSpec) else AnnotationSource(name, spec)
