"""Build every run object from the config, each from the spec OmegaConf makes of its node: data source,
datamodule (with the answer codec it shares with the model), model, callbacks, loggers, trainer."""

from __future__ import annotations

import logging
import warnings
from functools import partial
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedTokenizerBase

from callbacks.best_checkpoint import BestCheckpoint
from callbacks.early_stopping import KeptEarlyStopping
from callbacks.global_batch import GlobalBatch, accumulation
from callbacks.last_checkpoint import LastCheckpoint
from callbacks.lightning_compat import TrainLoaderAfterRestore, check_lightning_internals, without_hpc_scan
from callbacks.on_policy import OnPolicyCoarse
from callbacks.predictions_writer import PredictionsWriter
from callbacks.progress import progress_bar
from callbacks.refinement_trace import RefinementTrace
from callbacks.rng_state import RandomState
from callbacks.slurm_requeue import SlurmRequeue
from callbacks.step_boundary import DistributedSigterm
from datamodules.annotation_source import LOADERS, annotation_source
from datamodules.builtin import BuiltinSpec
from datamodules.builtin_source import BuiltinSource
from datamodules.datamodule import DataSource, GroundingDataModule
from grounding.answer_format.chat import answer_end_id
from grounding.answer_format.codec import AnswerCodec
from grounding.answer_format.corpus import tokenizer_corpus
from grounding.answer_format.prompt_ids import timestamp_length, video_timestamps
from grounding.answer_format.prompts import render_prompt, resolve_template
from grounding.answer_format.targets import RefineSchedule
from lightning_modules.grounding_module import GroundingModule
from lightning_modules.grpo_module import GRPOModule, GRPOSpec
from lightning_modules.language_model import build_language_model, grounding_token_ids, max_positions
from lightning_modules.pretrained import MissingModelError, resolve_pretrained
from lightning_modules.projector import video_token_count
from lightning_modules.released_weights import load_released_heads
from lightning_modules.tokenizer import (
    build_tokenizer,
    model_vocabulary_error,
    saved_tokenizer,
    tokenizer_from_files,
)
from lightning_modules.trainable import apply_trainable
from lightning_modules.video_llm import VideoLLM
from timerefine.pipeline.checkpoint_io import AtomicCheckpointIO
from timerefine.pipeline.config import ConfigError
from timerefine.pipeline.conventions import run_precision, run_protocol, run_timeline
from timerefine.pipeline.init_from_run import merged_base, start_from_run, starting_lora, starting_token_rows
from timerefine.pipeline.loggers import CSVResume, ResumableCSVLogger
from timerefine.pipeline.schema import ModelConfig
from timerefine.pipeline.strategy import build_strategy

log = logging.getLogger(__name__)

# Lightning's notes that no user of this project can act on: its own deprecated call into torch, the
# module's batch transfer (which it means to use), and an advert for a cloud logger.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
warnings.filterwarnings(
    "ignore", message=r"You have overridden `transfer_batch_to_device` in `LightningModule`"
)
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: "litlogger" not in str(record.msg)
)

# trainer.strategy=ddp with projector steps, in which the LM is unused (DDP refuses that by default)
UNUSED_PARAMETERS = "ddp_find_unused_parameters_true"


def build_source(data: DictConfig) -> DataSource:
    """``data.source`` as its spec: generated, or read from annotation files by ``LOADERS[data.name]``."""
    spec = OmegaConf.to_object(data.source)
    if isinstance(spec, BuiltinSpec):
        return BuiltinSource(spec)
    if data.name not in LOADERS:
        raise ConfigError(f"data.name={data.name}: no loader of that name; known: {', '.join(LOADERS)}")
    return annotation_source(data.name, spec)


def run_tokenizer(folder: Path, video_whitespace: str) -> PreTrainedTokenizerBase:
    """A run's tokenizer saved in ``folder``; TokenizerError naming it when it cannot be read."""
    return saved_tokenizer(folder, video_whitespace, f"{folder}: the run's tokenizer")


def build_tokenizer_for(
    cfg: DictConfig,
    source: DataSource,
    schedule: RefineSchedule,
    tokenizer_dir: Path | None,
    carried: dict[str, bytes] | None = None,
) -> PreTrainedTokenizerBase:
    """The run's saved tokenizer when ``tokenizer_dir`` exists (resume, evaluation), else the one its
    resume checkpoint ``carried``, else the one of the run it starts from (``init_from_run``, whose
    folder must hold it), else the pretrained one, else a local BPE trained on the training prompts
    and sample answers."""
    lm = cfg.model.lm
    if tokenizer_dir is not None and tokenizer_dir.is_dir():
        return run_tokenizer(tokenizer_dir, lm.video_whitespace)
    if carried is not None:
        return tokenizer_from_files(carried, lm.video_whitespace)
    if cfg.init_from_run:  # its checkpoint's token rows mean its tokenizer's tokens
        started = Path(cfg.init_from_run) / "tokenizer"
        if not started.is_dir():
            raise FileNotFoundError(
                f"init_from_run={cfg.init_from_run}: {started}: missing (the run's tokenizer)"
            )
        return run_tokenizer(started, lm.video_whitespace)
    train, template = source.records("train"), resolve_template(cfg.data.prompt_template)
    corpus = tokenizer_corpus(
        [render_prompt(template, r.query) for r in train], [r.duration for r in train], schedule
    )
    pretrained = lm.tokenizer or lm.name_or_path
    with_tokens = partial(
        build_tokenizer,
        texts=corpus,
        vocab_size=lm.tokenizer_vocab_size,
        style=lm.grounding_tokens,
        video_whitespace=lm.video_whitespace,
    )
    if not pretrained:
        return with_tokens(None)
    key = "model.lm.tokenizer" if lm.tokenizer else "model.lm.name_or_path"
    try:
        source = resolve_pretrained(pretrained, lm.dtype)
    except MissingModelError as error:  # a Hub name neither cached nor reachable
        raise ConfigError(f"{key}={error}") from error
    try:  # a folder of something else, a name not reachable offline, one that cannot spell timestamps
        tokenizer = with_tokens(source)
    except (OSError, ValueError) as error:
        reason = " ".join(str(error).split())
        raise ConfigError(f"{key}={pretrained}: no usable tokenizer loads from it ({reason})") from error
    if (
        lm.tokenizer
        and lm.name_or_path
        and (mismatch := model_vocabulary_error(tokenizer, lm.name_or_path, lm.dtype))
    ):
        raise ConfigError(
            f"model.lm.tokenizer={lm.tokenizer}: not the tokenizer of model.lm.name_or_path={lm.name_or_path} ({mismatch})"
        )
    return tokenizer


def answer_codec(
    cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, schedule: RefineSchedule
) -> AnswerCodec:
    """The codec of ``model.answer_tokens``, whose answers end as ``data.chat_template`` ends a turn;
    its slots are made (and, canonical, checked) now, before anything is written."""
    try:
        end_id = answer_end_id(cfg.data.chat_template, tokenizer)
    except ValueError as error:
        raise ConfigError(f"data.chat_template={cfg.data.chat_template}: {error}") from error
    codec = AnswerCodec(tokenizer, schedule, cfg.model.answer_tokens, end_id)
    try:
        codec.slots()
        if cfg.model.projector.temporal_embedding == "text":
            timestamp_length(codec)
    except ValueError as error:
        raise ConfigError(f"model.answer_tokens={cfg.model.answer_tokens}: {error}") from error
    return codec


def build_datamodule(
    cfg: DictConfig,
    tokenizer_dir: Path | None = None,
    source: DataSource | None = None,
    carried: dict[str, bytes] | None = None,
) -> GroundingDataModule:
    """The datamodule of ``source`` (default: ``data``'s) with its collator and the answer codec (the
    tokenizer and the refinement schedule) that the module shares; see :func:`build_tokenizer_for`."""
    source, model = source or build_source(cfg.data), OmegaConf.to_object(cfg.model)
    schedule = model.refine  # every use of K reads it
    tokenizer = build_tokenizer_for(cfg, source, schedule, tokenizer_dir, carried)
    codec = answer_codec(cfg, tokenizer, schedule)
    generated = model.inference.new_tokens(codec.answer_length())
    video_tokens = video_token_count(source.num_frames, model.projector.frames_per_token)
    stamped = model.projector.temporal_embedding == "text"  # answer_codec checked their length
    return GroundingDataModule(
        source,
        codec,
        OmegaConf.to_object(cfg.data),
        video_tokens=video_tokens,
        video_stamps=video_timestamps(codec, video_tokens, run_timeline(cfg)) if stamped else None,
        seed=cfg.seed,
        on_policy_fraction=schedule.on_policy.fraction if schedule.with_offsets else 0.0,
        max_positions=max_positions(model.lm),
        answer_tokens=max(generated, codec.answer_length() + 1),  # generated, or trained on
    )


def build_module(cfg: DictConfig, datamodule: GroundingDataModule, training: bool = True) -> GroundingModule:
    """The Video LLM around the datamodule's answer codec, and the LightningModule that trains it; a
    GRPO run's KL reference, a frozen copy of the model, only for ``training`` (not to evaluate)."""
    module = started_module(cfg, datamodule)
    apply_trainable(module.model, OmegaConf.to_object(cfg.model.trainable))
    if training and isinstance(module, GRPOModule):
        module.keep_reference()  # the starting policy, also when resuming
    return module


def started_module(cfg: DictConfig, datamodule: GroundingDataModule) -> GroundingModule:
    """The run's module built from ``model``, then ``init_from_run``'s weights (before ``model.trainable``
    freezes parts, and a GRPO run keeps its reference: :func:`build_module`)."""
    model: ModelConfig = OmegaConf.to_object(cfg.model)
    codec, source, timeline = datamodule.codec, datamodule.source, datamodule.timeline
    lm, lora = model.lm, model.lora if model.lora.enabled else None
    language_model = build_language_model(
        codec.tokenizer,
        lm,
        starting_lora(cfg, lora),
        model.init_from,
        starting_token_rows(cfg),
        base=merged_base(cfg, partial(started_module, datamodule=datamodule)),
    )
    video_llm = VideoLLM.from_config(
        language_model,
        codec,
        projector=model.projector,
        aux=model.aux,
        saliency_weight=model.saliency.weight,
        feature_dim=source.feature_dim,
        num_frames=source.num_frames,
        timeline=timeline,
    )
    load_released_heads(video_llm, model.init_from)
    grpo: GRPOSpec = OmegaConf.to_object(cfg.grpo)
    stage = (
        partial(GRPOModule, grpo=grpo, max_grad_norm=cfg.trainer.gradient_clip_val)
        if grpo.enabled
        else GroundingModule
    )
    module = stage(
        video_llm,
        codec,
        aux_weight=model.aux.weight,
        optim=model.optim,
        inference=model.inference,
        saliency_weight=model.saliency.weight,
        projector_steps=model.saliency.projector_steps,
        config=OmegaConf.to_container(cfg, resolve=True),
        timeline=timeline,
        protocol=run_protocol(cfg),
        base_name=lm.base,
    )
    if cfg.init_from_run:
        rows = grounding_token_ids(codec.tokenizer) if model.trainable.token_rows else []
        start_from_run(module, Path(cfg.init_from_run), model.lora.inherited, lora, rows)
    return module


def build_callbacks(cfg: DictConfig, output_dir: Path, schedule: RefineSchedule) -> list[Callback]:
    """The best checkpoint by the monitor (without a monitor the final weights are tested, and none
    is kept unless ``save_top_k`` asks for the latest validated ones), ``last.ckpt`` every
    ``last_every_n_steps`` steps and on a crash, the random state in checkpoints, the training loader
    built after a resumed checkpoint is restored, predictions, a SIGTERM acted on at a step boundary
    under DDP, the CSV log's resume point, progress, lr, on-policy refinement (without GRPO, when the
    module's ``schedule`` has coarse segments), gradient accumulation, the refinement trace figure."""
    spec = cfg.callbacks
    folder, checkpoint = output_dir / "checkpoints", spec.checkpoint
    best = BestCheckpoint(folder, checkpoint.monitor, checkpoint.mode, checkpoint.save_top_k)
    callbacks: list[Callback] = [
        *([best] if checkpoint.monitor or checkpoint.save_top_k != 1 else []),
        LastCheckpoint(folder, checkpoint.last_every_n_steps),
        RandomState(),
        TrainLoaderAfterRestore(),
        PredictionsWriter(output_dir / "predictions"),
        DistributedSigterm(),
    ]
    if cfg.model.refine.on_policy.fraction > 0 and schedule.with_offsets and not cfg.grpo.enabled:
        callbacks.append(
            OnPolicyCoarse(OmegaConf.to_object(cfg.model.refine.on_policy), cfg.data.eval_batch_size)
        )
    bar = progress_bar(spec.progress_bar) if cfg.trainer.enable_progress_bar else None
    callbacks.extend([bar] if bar else [])
    if cfg.logger.csv:
        callbacks.append(CSVResume())
    if spec.lr_monitor and (cfg.logger.csv or cfg.logger.tensorboard):
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if spec.early_stopping:
        callbacks.append(KeptEarlyStopping(**spec.early_stopping))
    if cfg.data.global_batch_size:
        callbacks.append(GlobalBatch(cfg.data.global_batch_size, cfg.data.batch_size))
    if spec.refinement_trace > 0:
        callbacks.append(RefinementTrace(output_dir / "refinement_trace", spec.refinement_trace))
    return callbacks


def build_loggers(cfg: DictConfig, output_dir: Path) -> list[Logger]:
    loggers: list[Logger] = []
    if cfg.logger.csv:
        loggers.append(ResumableCSVLogger(output_dir, name="logs", version="csv"))
    if cfg.logger.tensorboard:
        loggers.append(TensorBoardLogger(output_dir, name="logs", version="tensorboard"))
    return loggers


def check_monitors(callbacks: DictConfig, module: GroundingModule) -> None:
    """A monitored ``val/`` metric must be one the module logs (Lightning finds out only at the
    first validation, after training has started); ``train/`` ones, ``step`` and ``epoch`` are
    Lightning's to check; any other key is none."""
    logged = module.evaluation_keys("val")
    for key, monitor in (
        ("callbacks.checkpoint.monitor", callbacks.checkpoint.monitor),
        ("callbacks.early_stopping.monitor", (callbacks.early_stopping or {}).get("monitor")),
    ):
        if monitor and monitor.startswith("val/") and monitor not in logged:
            raise ConfigError(f"{key}={monitor}: not a metric this run logs; it logs {', '.join(logged)}")
        if monitor and not monitor.startswith(("val/", "train/")) and monitor not in ("step", "epoch"):
            raise ConfigError(
                f"{key}={monitor}: not a metric this run logs; monitor one of {', '.join(logged)}"
            )


NO_ACCUMULATION = "GRPO steps on each rollout as it comes, without gradient accumulation"


def grpo_trainer_args(trainer_args: dict) -> None:
    """Lightning's arguments for a GRPO run, optimised by hand (GRPOModule), which clips with
    ``gradient_clip_val`` itself and steps without gradient accumulation."""
    if (accumulate := trainer_args.get("accumulate_grad_batches", 1)) != 1:
        raise ConfigError(
            f"trainer.accumulate_grad_batches={accumulate}: {NO_ACCUMULATION}; remove it and choose "
            "data.batch_size and grpo.G"
        )
    trainer_args["gradient_clip_val"] = None


def build_trainer(cfg: DictConfig, output_dir: Path, module: GroundingModule) -> L.Trainer:
    check_lightning_internals()
    check_monitors(cfg.callbacks, module)
    on_slurm = SLURMEnvironment.detect()
    # Requeueing is done by callbacks.slurm_requeue at a step boundary, not in Lightning's handler.
    plugins: list = [AtomicCheckpointIO()] + ([SLURMEnvironment(auto_requeue=False)] if on_slurm else [])
    trainer_args = OmegaConf.to_container(cfg.trainer)
    if module.projector_steps and trainer_args["strategy"] == "ddp":
        trainer_args["strategy"] = UNUSED_PARAMETERS
    trainer_args["strategy"] = build_strategy(trainer_args["strategy"], module)
    trainer_args["enable_progress_bar"] &= cfg.callbacks.progress_bar != "none"
    precision = run_precision(cfg)
    rank_zero_only(log.info)("precision: %s (%s)", precision.precision, precision.reason)
    trainer_args["precision"] = precision.precision
    if cfg.grpo.enabled:
        grpo_trainer_args(trainer_args)
    callbacks = build_callbacks(cfg, output_dir, module.codec.schedule)
    if on_slurm:  # after the best checkpoint (if any), before last.ckpt (SlurmRequeue's docstring)
        last = next(i for i, callback in enumerate(callbacks) if isinstance(callback, LastCheckpoint))
        callbacks.insert(last, SlurmRequeue())
    try:
        trainer = L.Trainer(
            **trainer_args,
            default_root_dir=output_dir,
            use_distributed_sampler=False,  # the datamodule shards by rank itself, without padding
            callbacks=callbacks,
            logger=build_loggers(cfg, output_dir) or False,
            plugins=plugins,
        )
    except (MisconfigurationException, ValueError, TypeError) as error:  # a device, strategy or value
        reason = " ".join(str(error).split())
        raise ConfigError(
            f"trainer (accelerator, devices, strategy, ...): Lightning refuses it: {reason}"
        ) from error
    without_hpc_scan(trainer)
    if module.projector_steps and trainer.world_size > 1 and trainer_args["strategy"] != UNUSED_PARAMETERS:
        raise ConfigError(
            f"model.saliency.projector_steps={module.projector_steps} with {trainer.world_size} processes "
            "needs trainer.strategy=ddp (run as DDP that allows unused parameters): the LM takes no "
            "part in those steps"
        )
    data, batches_per_step = cfg.data, trainer.accumulate_grad_batches  # +trainer.accumulate_grad_batches
    if data.global_batch_size and batches_per_step != 1:
        raise ConfigError(
            f"trainer.accumulate_grad_batches={batches_per_step} with data.global_batch_size="
            f"{data.global_batch_size}: the global batch size sets the accumulation; give one of them"
        )
    if data.global_batch_size:  # checked now, before anything is written; GlobalBatch sets it at setup
        try:
            batches_per_step = accumulation(data.global_batch_size, data.batch_size, trainer.world_size)
        except ValueError as error:
            raise ConfigError(str(error)) from error
        if cfg.grpo.enabled and batches_per_step > 1:
            raise ConfigError(
                f"data.global_batch_size={data.global_batch_size}: {NO_ACCUMULATION}; set it to null and "
                "choose data.batch_size and grpo.G"
            )
    if isinstance(trainer.val_check_interval, int):  # optimizer steps, as max_steps; Lightning counts
        steps_per_batch = cfg.grpo.num_iterations if cfg.grpo.enabled else 1  # batches (a multiple: schema)
        trainer.val_check_interval = trainer.val_check_interval * batches_per_step // steps_per_batch
    return trainer
