"""Build every run object from the config: data source, datamodule, model, callbacks, loggers, trainer."""

from __future__ import annotations

import inspect
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import (
    Callback,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
)
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from callbacks.last_checkpoint import LastCheckpoint
from callbacks.on_policy import OnPolicyCoarse
from callbacks.predictions_writer import PredictionsWriter
from callbacks.progress import StepRichProgressBar, StepTQDMProgressBar
from callbacks.slurm_requeue import SlurmRequeue
from datamodules.annotation_source import AnnotationSource, activitynet_source, charades_sta_source
from datamodules.builtin import BuiltinSpec
from datamodules.builtin_source import BuiltinSource
from datamodules.datamodule import DataSource, GroundingDataModule
from lightning_modules.aux_head import AuxHead
from lightning_modules.grounding_module import GroundingModule, InferenceSpec, OptimSpec
from lightning_modules.language_model import LoraSpec, TinyLMSpec, build_language_model
from lightning_modules.projector import build_projector
from lightning_modules.tokenizer import add_grounding_tokens, build_tokenizer
from lightning_modules.video_llm import VideoLLM
from timerefine.answer_format.chat import answer_end_id
from timerefine.answer_format.codec import AnswerCodec
from timerefine.answer_format.corpus import tokenizer_corpus
from timerefine.answer_format.prompts import render_prompt
from timerefine.answer_format.targets import RefineSchedule
from timerefine.answer_format.timeline import MAX_INDEX
from timerefine.answer_format.tokens import VIDEO
from timerefine.pipeline.config import ConfigError
from timerefine.pipeline.loggers import ResumableCSVLogger
from timerefine.pipeline.strategy import build_strategy

SOURCES = {"builtin": BuiltinSource, "charades_sta": charades_sta_source, "activitynet": activitynet_source}


def build_source(data: DictConfig) -> DataSource:
    if data.name not in SOURCES:
        raise ConfigError(f"data.name={data.name!r} is not a known dataset; choose from {sorted(SOURCES)}")
    factory, options = SOURCES[data.name], OmegaConf.to_container(data.source)
    accepted = inspect.signature(AnnotationSource if factory is not BuiltinSource else BuiltinSpec).parameters
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"data.source has keys that data={data.name} does not take: {unknown}")
    return factory(**options)


def build_datamodule(cfg: DictConfig) -> GroundingDataModule:
    return GroundingDataModule(
        build_source(cfg.data),
        batch_size=cfg.data.batch_size,
        eval_batch_size=cfg.data.eval_batch_size,
        num_workers=cfg.data.num_workers,
        seed=cfg.seed,
        prompt_template=cfg.data.prompt_template,
        chat_template=cfg.data.chat_template,
    )


def refine_schedule(model: DictConfig) -> RefineSchedule:
    """``model.refine`` (``steps`` is K) as the one object every use of K reads."""
    refine = model.refine
    return RefineSchedule(
        refine.steps,
        tuple(refine.noise_std),
        refine.relative,
        refine.contain_gt,
        tuple(refine.get("residual_std") or ()),
    )


def frame_index_ids(tokenizer: PreTrainedTokenizerBase, video_tokens: int) -> torch.Tensor:
    """The tens and ones digit token of each video token's index on the 00-99 timeline, (tokens, 2)."""
    indices = [round(i * MAX_INDEX / max(video_tokens - 1, 1)) for i in range(video_tokens)]
    return torch.tensor([tokenizer.convert_tokens_to_ids(list(f"{i:02d}")) for i in indices])


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
    except ValueError as error:
        raise ConfigError(f"model.answer_tokens={cfg.model.answer_tokens}: {error}") from error
    return codec


def build_module(
    cfg: DictConfig, datamodule: GroundingDataModule, tokenizer_dir: Path | None = None
) -> GroundingModule:
    """Tokenizer, LM, projector, aux head, and the answer codec the module and the datamodule share.
    The tokenizer is the run's saved one when ``tokenizer_dir`` exists (resume, evaluation), else
    pretrained, else trained on the data's text."""
    model = cfg.model
    schedule = refine_schedule(model)
    if tokenizer_dir is not None and tokenizer_dir.is_dir():
        tokenizer = add_grounding_tokens(AutoTokenizer.from_pretrained(tokenizer_dir))
    else:
        train = datamodule.records("train")
        prompts = [render_prompt(datamodule.prompt_template, r.query) for r in train]
        corpus = tokenizer_corpus(prompts, [r.duration for r in train], schedule)
        tokenizer = build_tokenizer(
            model.lm.tokenizer or model.lm.name_or_path, corpus, model.lm.tokenizer_vocab_size
        )
    codec = answer_codec(cfg, tokenizer, schedule)
    lm = build_language_model(
        tokenizer,
        model.lm.name_or_path,
        TinyLMSpec(**model.lm.tiny),
        LoraSpec(**{k: v for k, v in model.lora.items() if k != "enabled"}) if model.lora.enabled else None,
        model.lm.dtype,
        model.lm.gradient_checkpointing,
    )
    hidden = lm.config.hidden_size
    aux = (
        AuxHead(hidden, model.aux.head, model.aux.loss)
        if model.aux.weight > 0 and schedule.with_offsets
        else None
    )
    time_kind = model.projector.temporal_embedding
    if time_kind not in ("none", "learned", "digits"):
        raise ConfigError(f"model.projector.temporal_embedding={time_kind!r}: choose none, learned or digits")
    if model.saliency.weight > 0 and not model.projector.query_conditioned:
        raise ConfigError(
            "model.saliency.weight > 0 needs model.projector.query_conditioned=true: "
            "without it a video token cannot know which query it is scored against"
        )
    num_frames, per_token = datamodule.source.num_frames, model.projector.frames_per_token
    if per_token < 1 or num_frames % per_token:
        raise ConfigError(
            f"model.projector.frames_per_token={per_token} must be >= 1 and divide the data's {num_frames} frames"
        )
    video_tokens = num_frames // per_token
    video_llm = VideoLLM(
        lm,
        build_projector(
            model.projector.kind,
            datamodule.source.feature_dim,
            hidden,
            num_frames,
            time_kind == "learned",
            per_token,
            model.projector.query_conditioned,
        ),
        tokenizer.convert_tokens_to_ids(VIDEO),
        aux,
        frame_index_ids(tokenizer, video_tokens) if time_kind == "digits" else None,
        nn.Linear(hidden, 1) if model.saliency.weight > 0 else None,
    )
    datamodule.attach(codec, video_tokens)
    return GroundingModule(
        video_llm,
        codec,
        model.aux.weight,
        OptimSpec(**model.optim),
        InferenceSpec(**model.inference),
        model.saliency.weight,
    )


def build_callbacks(cfg: DictConfig, output_dir: Path, schedule: RefineSchedule) -> list[Callback]:
    """The best checkpoint (first, so ``trainer.checkpoint_callback`` is it), ``last.ckpt`` every
    ``last_every_n_steps`` steps and on a crash, predictions, progress, lr, on-policy refinement
    (when ``schedule``, the module's, has coarse segments to start from)."""
    spec = cfg.callbacks
    callbacks: list[Callback] = [
        ModelCheckpoint(
            dirpath=output_dir / "checkpoints",
            filename="best-step{step}",
            auto_insert_metric_name=False,
            monitor=spec.checkpoint.monitor,
            mode=spec.checkpoint.mode,
            save_top_k=spec.checkpoint.save_top_k,
        ),
        LastCheckpoint(output_dir / "checkpoints", spec.checkpoint.last_every_n_steps),
        PredictionsWriter(output_dir / "predictions"),
    ]
    on_policy = cfg.model.refine.on_policy
    if on_policy.fraction > 0 and schedule.with_offsets:
        callbacks.append(
            OnPolicyCoarse(
                on_policy.fraction, on_policy.every_n_steps, on_policy.num_samples, cfg.data.eval_batch_size
            )
        )
    bars = {"rich": StepRichProgressBar, "tqdm": StepTQDMProgressBar}
    if cfg.trainer.enable_progress_bar and spec.progress_bar in bars:
        callbacks.append(bars[spec.progress_bar]())
    if spec.lr_monitor and (cfg.logger.csv or cfg.logger.tensorboard):
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if spec.early_stopping:
        callbacks.append(EarlyStopping(**spec.early_stopping))
    return callbacks


def build_loggers(cfg: DictConfig, output_dir: Path) -> list[Logger]:
    loggers: list[Logger] = []
    if cfg.logger.csv:
        loggers.append(ResumableCSVLogger(output_dir, name="logs", version="csv"))
    if cfg.logger.tensorboard:
        loggers.append(TensorBoardLogger(output_dir, name="logs", version="tensorboard"))
    return loggers


def accumulation(data: DictConfig, world_size: int) -> int:
    """Gradient accumulation that keeps ``data.global_batch_size`` whatever the number of processes."""
    if data.global_batch_size is None:
        return 1
    per_step = data.batch_size * world_size
    if data.global_batch_size % per_step:
        raise ConfigError(
            f"data.global_batch_size={data.global_batch_size} is not a multiple of data.batch_size x "
            f"processes = {data.batch_size} x {world_size} = {per_step}"
        )
    return data.global_batch_size // per_step


def build_trainer(cfg: DictConfig, output_dir: Path, module: GroundingModule) -> L.Trainer:
    on_slurm = SLURMEnvironment.detect()
    # Requeueing is done by callbacks.slurm_requeue at a step boundary, not in Lightning's handler.
    plugins = [SLURMEnvironment(auto_requeue=False)] if on_slurm else []
    trainer_args = OmegaConf.to_container(cfg.trainer)
    trainer_args["strategy"] = build_strategy(trainer_args["strategy"], module)
    trainer_args["enable_progress_bar"] &= cfg.callbacks.progress_bar != "none"
    trainer = L.Trainer(
        **trainer_args,
        default_root_dir=output_dir,
        use_distributed_sampler=False,  # the datamodule shards by rank itself, without padding
        callbacks=build_callbacks(cfg, output_dir, module.codec.schedule)
        + ([SlurmRequeue()] if on_slurm else []),
        logger=build_loggers(cfg, output_dir) or False,
        plugins=plugins,
    )
    trainer.accumulate_grad_batches = accumulation(cfg.data, trainer.world_size)
    return trainer
