"""The config schema: every default of the ``model`` and ``data`` groups, written once, in dataclasses.

Each field's default lives in the spec dataclass of the object it builds (``RefineSchedule``,
``OptimSpec``, ``BuiltinSpec``, ``QuirkPolicy``, ...); this module only composes them. The YAML
files in ``conf/model`` and ``conf/data`` start from these nodes (``defaults: [/schema/...@_here_]``)
and hold nothing but what a choice changes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from callbacks.on_policy import OnPolicySpec
from datamodules.annotation_source import AnnotationSpec
from datamodules.builtin import BuiltinSpec
from lightning_modules.aux_head import AuxSpec
from lightning_modules.grounding_module import InferenceSpec, OptimSpec
from lightning_modules.language_model import LMSpec, LoraSpec
from lightning_modules.projector import ProjectorSpec
from timerefine.answer_format.targets import RefineSchedule


@dataclass
class LoraConfig(LoraSpec):
    """LoRA adapters (off by default: the tiny LM trains fully)."""

    enabled: bool = False


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
    ``canonical`` (the tokenizer's own; timerefine/answer_format/codec.py)."""

    lm: LMSpec = field(default_factory=LMSpec)
    answer_tokens: str = "digits"
    lora: LoraConfig = field(default_factory=LoraConfig)
    projector: ProjectorSpec = field(default_factory=ProjectorSpec)
    refine: RefineConfig = field(default_factory=RefineConfig)
    aux: AuxSpec = field(default_factory=AuxSpec)
    inference: InferenceSpec = field(default_factory=InferenceSpec)
    saliency: SaliencySpec = field(default_factory=SaliencySpec)
    optim: OptimSpec = field(default_factory=OptimSpec)


@dataclass
class DataConfig:
    """The keys every dataset shares; ``source`` is the dataset's own spec. With ``global_batch_size``
    set, gradient accumulation = global_batch_size / (batch_size x devices x nodes).
    ``prompt_template``: a name from ``PROMPTS`` or a template (timerefine/answer_format/prompts.py);
    ``chat_template``: none, tokenizer or a named one (timerefine/answer_format/chat.py)."""

    name: str
    source: Any
    batch_size: int = 32
    eval_batch_size: int = 100
    global_batch_size: int | None = None
    num_workers: int = 0
    prompt_template: str = "default"
    chat_template: str = "none"


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
}


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
    """Put the defaults into Hydra's ConfigStore as ``/schema/model`` and ``/schema/data/<name>``."""
    store = ConfigStore.instance()
    store.store(group="schema", name="model", node=as_node(ModelConfig()))
    for name, data in DATASETS.items():
        store.store(group="schema/data", name=name, node=as_node(data))
