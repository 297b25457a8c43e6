"""The config schema, stored in Hydra as structured configs so OmegaConf checks every key and type.
Each default and range rule is written once, on the spec of the object it builds (``RefineSchedule``,
``OptimSpec``, ``BuiltinSpec``, ...). conf/train.yaml starts from ``RunConfig``, a conf/data YAML from
one of ``DATA_SCHEMAS``; the YAML comments say what the keys do. Rules on a whole composed config
(what may not train, which keys nothing reads): training_rules.py."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import MISSING, DictConfig, OmegaConf

from callbacks.on_policy import OnPolicySpec
from datamodules.annotation_source import AnnotationSpec, CharadesSpec, JsonlSpec
from datamodules.builtin import BuiltinSpec
from datamodules.datamodule import DataSpec
from datamodules.jsonl import LIGHTHOUSE_DIM, LIGHTHOUSE_KEYS
from grounding.answer_format.codec import ANSWER_TOKENS
from grounding.answer_format.targets import RefineSchedule
from grounding.checks import NON_NEGATIVE, Checked, a_name, checked, integer, not_a_file, one_of, optional
from grounding.metrics.protocols import EXACT, PROTOCOLS
from lightning_modules.aux_head import AuxSpec
from lightning_modules.decoding import InferenceSpec
from lightning_modules.grounding_module import SaliencySpec
from lightning_modules.grpo_module import GRPOSpec
from lightning_modules.language_model import LMSpec, LoraSpec
from lightning_modules.optimization import OptimSpec
from lightning_modules.projector import ProjectorSpec
from lightning_modules.released_weights import InitFromSpec
from lightning_modules.trainable import TrainableSpec
from timerefine.pipeline.precision import AUTO, PRECISIONS


def a_run_folder(value: str) -> str | None:
    """A run's folder: its config.yaml and checkpoints/ (a relative path: in the current folder)."""
    folder = Path(value)
    if not (folder / "config.yaml").is_file() or not (folder / "checkpoints").is_dir():
        relative = "" if folder.is_absolute() else f", relative to {Path.cwd()}"
        return f"{value} is not a run directory (config.yaml and checkpoints/){relative}"
    return None


EARLY_STOPPING_FORM = (
    "must be null or a mapping of EarlyStopping's arguments with a monitor and a mode, "
    "e.g. {monitor: val/mIoU, mode: max, patience: 5}"
)


def early_stopping_args(value: Any) -> str | None:
    """EarlyStopping's keyword arguments, ``monitor`` and ``mode`` among them (its default mode, min,
    would stop a run whose val/mIoU rises), as EarlyStopping takes them."""
    if not isinstance(value, dict) or not value.get("monitor") or not isinstance(value["monitor"], str):
        return EARLY_STOPPING_FORM
    if "mode" not in value:
        return (
            "needs a mode (max for val/mIoU): EarlyStopping's default, min, stops a run whose score rises "
            "(a run saved without one ran with min: continue it with mode: min)"
        )
    try:
        EarlyStopping(**value)
    except (TypeError, ValueError, MisconfigurationException) as error:
        return f"EarlyStopping refuses it: {' '.join(str(error).split())}"
    return None


def a_val_interval(value: Any) -> str | None:
    """``trainer.val_check_interval``: steps, a fraction of an epoch, or a time (Lightning parses it)."""
    if isinstance(value, (str, dict)):
        return None
    steps = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    if steps or (isinstance(value, float) and 0 < value <= 1):
        return None
    return (
        "must be an integer number of steps >= 1, a fraction of an epoch in (0, 1] (with "
        "check_val_every_n_epoch) or a time 'DD:HH:MM:SS'"
    )


INHERITED = ("continue", "merge")  # model.lora.inherited: what becomes of init_from_run's adapters


@dataclass
class LoraOption(LoraSpec):
    """LoRA adapters (off by default: the tiny LM trains fully). ``inherited``: what becomes of
    ``init_from_run``'s adapters, ``continue`` (train them on) or ``merge`` (into the LM, then new ones)."""

    enabled: bool = False
    inherited: str = checked("continue", one_of(*INHERITED))


@dataclass(frozen=True)
class RefineConfig(RefineSchedule):
    """The refinement targets and on-policy refinement (callbacks/on_policy.py)."""

    on_policy: OnPolicySpec = field(default_factory=OnPolicySpec)


@dataclass
class ModelConfig(Checked):
    """TimeRefine (K = ``refine.steps``) with the aux head; ``model=direct`` sets K = 0, no head.
    ``answer_tokens``: how answers are spelled in tokens, ``digits`` (one token per digit/sign) or
    ``canonical`` (the tokenizer's own; grounding/answer_format/codec.py)."""

    lm: LMSpec = field(default_factory=LMSpec)
    answer_tokens: str = checked("digits", one_of(*ANSWER_TOKENS))
    lora: LoraOption = field(default_factory=LoraOption)
    projector: ProjectorSpec = field(default_factory=ProjectorSpec)
    refine: RefineConfig = field(default_factory=RefineConfig)
    aux: AuxSpec = field(default_factory=AuxSpec)
    inference: InferenceSpec = field(default_factory=InferenceSpec)
    saliency: SaliencySpec = field(default_factory=SaliencySpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    init_from: InitFromSpec = field(default_factory=InitFromSpec)
    trainable: TrainableSpec = field(default_factory=TrainableSpec)

    def relations(self) -> Iterator[str]:
        if self.saliency.weight > 0 and not self.projector.query_conditioned:
            yield (
                f"saliency.weight={self.saliency.weight} needs projector.query_conditioned=true: without "
                "it a video token cannot know which query it is scored against"
            )
        if self.saliency.projector_steps and not self.saliency.weight:
            yield (
                "saliency.projector_steps train on the saliency loss: with saliency.weight=0 set "
                "saliency.projector_steps=0"
            )
        if not self.trainable.token_rows and not self.lora.enabled:  # without LoRA the whole LM trains
            yield "trainable.token_rows=false needs lora.enabled=true: without LoRA the whole LM trains"
        if self.inference.final != "last" and not (self.aux.weight > 0 and self.refine.with_offsets):
            yield (
                f"inference.final={self.inference.final} reads the aux head, which a model without offsets "
                "(refine.steps=0) or with aux.weight=0 has not: set inference.final=last"
            )
        if self.lm.weights == "random" and self.lora.enabled:
            yield "lm.weights=random needs lora.enabled=false: adapters on a frozen random LM learn nothing useful"


# The schemas a conf/data YAML starts from (``/schema/data/<name>@_here_``): the generated data, and
# annotation files read by ``LOADERS[data.name]``.
DATA_SCHEMAS = {
    "builtin": DataSpec("builtin", BuiltinSpec()),
    "annotated": DataSpec(MISSING, AnnotationSpec(MISSING, MISSING)),
    "charades": DataSpec("charades_sta", CharadesSpec(MISSING, MISSING)),
    "jsonl": DataSpec("jsonl", JsonlSpec(MISSING, MISSING)),
    "lighthouse": DataSpec(
        "jsonl", JsonlSpec(MISSING, MISSING, keys=LIGHTHOUSE_KEYS, feature_dim=LIGHTHOUSE_DIM)
    ),
}


@dataclass
class EvalConfig(Checked):
    """``protocol``: how IoUs become R1@m and mIoU (grounding/metrics/protocols.py)."""

    protocol: str = checked(EXACT.name, one_of(*PROTOCOLS))


@dataclass
class TrainerConfig(Checked):
    """Arguments of ``lightning.Trainer``; Lightning checks the union-typed ones (``Any``) itself, but
    for a ``val_check_interval`` it would divide by once training runs."""

    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = checked(1, integer(1))
    strategy: Any = "auto"
    precision: str = checked(AUTO, one_of(*PRECISIONS))
    max_steps: int = checked(1000, integer(-1))
    max_epochs: int | None = checked(-1, optional(integer(-1)))
    val_check_interval: Any = checked(500, optional(a_val_interval))
    check_val_every_n_epoch: int | None = checked(None, optional(integer(1)))
    limit_val_batches: Any = None
    limit_test_batches: Any = None
    gradient_clip_val: float | None = checked(1.0, optional(NON_NEGATIVE))
    log_every_n_steps: int = checked(20, integer(1))
    num_sanity_val_steps: int = checked(2, integer(-1))
    deterministic: bool = False
    enable_progress_bar: bool = True

    def relations(self) -> Iterator[str]:
        if isinstance(self.val_check_interval, float) and self.check_val_every_n_epoch is None:
            yield (
                f"val_check_interval={self.val_check_interval} is a fraction of an epoch, which needs "
                "check_val_every_n_epoch (e.g. 1); an int counts steps"
            )
        if self.max_steps == -1 and self.max_epochs == -1:
            yield (
                "max_steps=-1 (no step limit) needs max_epochs >= 0 (null: 1000): the learning-rate "
                "schedule needs the run's step count, and max_epochs=-1 leaves it endless"
            )


@dataclass
class LoggerConfig:
    csv: bool = True
    tensorboard: bool = True


@dataclass
class CheckpointConfig(Checked):
    monitor: str | None = "val/mIoU"
    mode: str = checked("max", one_of("min", "max"))
    save_top_k: int = checked(1, integer(-1))
    last_every_n_steps: int = checked(100, integer(1))


@dataclass
class CallbacksConfig(Checked):
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    progress_bar: str = checked("auto", one_of("auto", "rich", "tqdm", "none"))
    lr_monitor: bool = True
    early_stopping: Any = checked(None, optional(early_stopping_args))
    refinement_trace: int = checked(6, integer(0))


@dataclass
class RunConfig(Checked):
    """The root: the run's own keys, then one node per group."""

    seed: int = checked(0, integer(0, 2**32 - 1))
    output_dir: str = checked("runs/${now:%Y-%m-%d_%H-%M-%S}", not_a_file)
    resume: str | None = checked("auto", optional(a_name))
    test: bool = True
    init_from_run: str | None = checked(None, optional(a_run_folder))
    data: DataSpec = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    grpo: GRPOSpec = field(default_factory=GRPOSpec)

    def relations(self) -> Iterator[str]:
        if self.test and self.trainer.limit_test_batches == 0:
            yield "trainer.limit_test_batches=0 tests nothing (train.py skips the test with test=false)"
        if self.init_from_run is None and 0 < self.trainer.max_steps <= self.model.saliency.projector_steps:
            yield (
                f"trainer.max_steps={self.trainer.max_steps} leaves no step for the LM after "
                f"model.saliency.projector_steps={self.model.saliency.projector_steps}; set fewer "
                "projector steps (0: none) or more steps"
            )
        if not self.grpo.enabled:
            return
        if self.model.saliency.projector_steps:
            yield "model.saliency.projector_steps must be 0 with grpo.enabled=true (a GRPO step reads the LM)"
        if self.init_from_run is None:
            yield "grpo.enabled=true needs init_from_run=<a supervised run's folder> to start from"
        interval = self.trainer.val_check_interval  # an int counts steps (a float: epochs)
        steps = {
            "trainer.max_steps": max(self.trainer.max_steps, 0),
            "trainer.val_check_interval": interval if type(interval) is int else 0,
            "callbacks.checkpoint.last_every_n_steps": self.callbacks.checkpoint.last_every_n_steps,
        }
        for key, value in steps.items():
            if value % self.grpo.num_iterations:
                yield f"{key}={value} must be a multiple of grpo.num_iterations={self.grpo.num_iterations} (steps per rollout)"


def _writable(node: DictConfig) -> DictConfig:
    """``node`` with the read-only flag of frozen spec dataclasses lifted: YAML files merge into it."""
    OmegaConf.set_readonly(node, None)
    for key, child in node.items_ex(resolve=False):
        if isinstance(child, DictConfig) and not OmegaConf.is_missing(node, key):
            _writable(child)
    return node


def register_schemas() -> None:
    """Store ``RunConfig`` as ``/schema/run`` and each of ``DATA_SCHEMAS`` as ``/schema/data/<name>``."""
    store = ConfigStore.instance()
    store.store(group="schema", name="run", node=_writable(OmegaConf.structured(RunConfig)))
    for name, data in DATA_SCHEMAS.items():
        store.store(group="schema/data", name=name, node=_writable(OmegaConf.structured(data)))
