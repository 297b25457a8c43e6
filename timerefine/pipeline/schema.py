"""The config schema: every default of the ``model``, ``data`` and ``eval`` groups, written once, in dataclasses.

Each field's default lives in the spec dataclass of the object it builds (``RefineSchedule``,
``OptimSpec``, ``BuiltinSpec``, ``QuirkPolicy``, ...); this module only composes them. The YAML
files in ``conf/model`` and ``conf/data`` start from these nodes (``defaults: [/schema/...@_here_]``)
and hold nothing but what a choice changes.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from callbacks.on_policy import OnPolicySpec
from datamodules.annotation_source import AnnotationSpec, JsonlSpec
from datamodules.builtin import BuiltinSpec
from grounding.answer_format.targets import RefineSchedule
from grounding.answer_format.timeline import DEFAULT_TIMELINE
from grounding.metrics.protocols import EXACT
from lightning_modules.aux_head import AuxSpec
from lightning_modules.grounding_module import InferenceSpec, OptimSpec
from lightning_modules.language_model import LMSpec, LoraSpec
from lightning_modules.projector import ProjectorSpec
from lightning_modules.released_weights import InitFromSpec
from lightning_modules.trainable import TrainableSpec


@dataclass
class LoraOption(LoraSpec):
    """LoRA adapters (off by default: the tiny LM trains fully). ``inherited``: what becomes of
    ``init_from_run``'s adapters, ``continue`` (train them on) or ``merge`` (into the LM, then new ones)."""

    enabled: bool = False
    inherited: str = "continue"


@dataclass(frozen=True)
class RefineConfig(RefineSchedule):
    """The refinement targets and on-policy refinement (callbacks/on_policy.py)."""

    on_policy: OnPolicySpec = field(default_factory=OnPolicySpec)


@dataclass(frozen=True)
class SaliencySpec:
    """Weight of a per-video-token BCE "inside the queried moment?" on the projector's output (needs
    ``projector.query_conditioned``); 0 turns it off."""

    weight: float = 3.0


@dataclass
class ModelConfig:
    """TimeRefine (K = ``refine.steps``) with the aux head; ``model=direct`` sets K = 0, no head.
    ``answer_tokens``: how answers are spelled in tokens, ``digits`` (one token per digit/sign) or
    ``canonical`` (the tokenizer's own; grounding/answer_format/codec.py)."""

    lm: LMSpec = field(default_factory=LMSpec)
    answer_tokens: str = "digits"
    lora: LoraOption = field(default_factory=LoraOption)
    projector: ProjectorSpec = field(default_factory=ProjectorSpec)
    refine: RefineConfig = field(default_factory=RefineConfig)
    aux: AuxSpec = field(default_factory=AuxSpec)
    inference: InferenceSpec = field(default_factory=InferenceSpec)
    saliency: SaliencySpec = field(default_factory=SaliencySpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    init_from: InitFromSpec = field(default_factory=InitFromSpec)
    trainable: TrainableSpec = field(default_factory=TrainableSpec)


@dataclass
class DataConfig:
    """The keys every dataset shares; ``source`` is the dataset's own spec. With ``global_batch_size``
    set, gradient accumulation = global_batch_size / (batch_size x devices x nodes). ``timeline``:
    what the answers' frame indices mean (grounding/answer_format/timeline.py). ``prompt_template``:
    a name from ``PROMPTS`` or a template (grounding/answer_format/prompts.py); ``chat_template``:
    none, tokenizer or a named one (grounding/answer_format/chat.py). ``query_too_long``: a query
    whose prompt, video tokens and answer exceed the LM's positions stops the run naming its
    ``file:line`` (``error``) or is skipped, counted in the coverage and logged (``drop``)."""

    name: str
    source: Any
    batch_size: int = 32
    eval_batch_size: int = 100
    global_batch_size: int | None = None
    num_workers: int = 0
    prompt_template: str = "default"
    chat_template: str = "none"
    timeline: str = DEFAULT_TIMELINE.name
    query_too_long: str = "error"


@dataclass
class EvalConfig:
    """``protocol``: how IoUs become R1@m and mIoU (grounding/metrics/protocols.py)."""

    protocol: str = EXACT.name


SPLITS = {"train": "train", "val": "val", "test": "test"}
# Lighthouse's JSONL layout (QVHighlights and the datasets it converts), and its SlowFast (2304) + CLIP
# (512) clip features concatenated; Lighthouse's 2818 adds 2 temporal-endpoint dimensions it computes
# at load time, which files here do not hold (the projector places tokens on the timeline itself).
LIGHTHOUSE_KEYS = {
    "qid": "qid",
    "query": "query",
    "video_id": "vid",
    "duration": "duration",
    "windows": "relevant_windows",
}
SLOWFAST_CLIP_DIM = 2304 + 512


def lighthouse(root: str, prefix: str, splits: dict[str, str], **spec: Any) -> DataConfig:
    """A dataset in Lighthouse's layout: ``{prefix}_{split}_release.jsonl`` files in ``root``."""
    files = {own: f"{prefix}_{own}_release.jsonl" for own in splits.values()}
    return DataConfig(
        "jsonl",
        JsonlSpec(
            root=root,
            splits=splits,
            annotation_files=files,
            keys=LIGHTHOUSE_KEYS,
            feature_dim=SLOWFAST_CLIP_DIM,
            **spec,
        ),
    )


DATASETS: dict[str, DataConfig] = {
    "builtin": DataConfig("builtin", BuiltinSpec()),
    "charades_sta": DataConfig(
        "charades_sta",
        AnnotationSpec(root="data/charades_sta", splits={"train": "train", "val": "test", "test": "test"}),
    ),
    "activitynet": DataConfig(
        "activitynet",
        AnnotationSpec(
            root="data/activitynet_captions", splits={"train": "train", "val": "val_1", "test": "val_2"}
        ),
    ),
    "jsonl": DataConfig("jsonl", JsonlSpec(root="data/jsonl", splits=SPLITS)),
    # 150-s videos in 2-s clips: 75 clips, as 150 frames = 75 video tokens of 2 frames, one per clip.
    # The test split's windows are withheld: test on val.
    "qvhighlights": lighthouse(
        "data/qvhighlights", "highlight", {"train": "train", "val": "val", "test": "val"}, num_frames=150
    ),
    # Videos of about 5 min (2-s clips: about 150): 200 frames, 100 video tokens.
    "tacos": lighthouse("data/tacos", "tacos", SPLITS, num_frames=200),
    # Videos of up to 30 s (2-s clips: 15): 30 frames, 15 video tokens.
    "didemo": lighthouse("data/didemo", "didemo", SPLITS, num_frames=30),
}


Spec = TypeVar("Spec")


def from_node(spec_type: type[Spec], node: DictConfig | dict[str, Any]) -> Spec:
    """A spec dataclass built by keyword from its config node: its own fields only (a node may hold
    more, e.g. ``model.refine.on_policy``), nested specs built the same way, lists made tuples where
    the field holds a tuple."""
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    hints = typing.get_type_hints(spec_type)
    kwargs = {}
    for spec_field in dataclasses.fields(spec_type):
        if spec_field.name not in values:
            continue
        value, hint = values[spec_field.name], hints[spec_field.name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = from_node(hint, value)
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[spec_field.name] = value
    return spec_type(**kwargs)


def as_node(spec: Any) -> dict[str, Any]:
    """A spec as plain config values (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(asdict(spec))


def register_schemas() -> None:
    """Put the defaults into Hydra's ConfigStore as ``/schema/model``, ``/schema/eval`` and
    ``/schema/data/<name>``."""
    store = ConfigStore.instance()
    store.store(group="schema", name="model", node=as_node(ModelConfig()))
    store.store(group="schema", name="eval", node=as_node(EvalConfig()))
    for name, data in DATASETS.items():
        store.store(group="schema/data", name=name, node=as_node(data))
