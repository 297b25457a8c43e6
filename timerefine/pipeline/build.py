"""Build every run object from the config: data source, datamodule, model, callbacks, loggers, trainer."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import (
    Callback,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
)
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from callbacks.last_checkpoint import LastCheckpoint
from callbacks.lightning_compat import check_lightning_internals
from callbacks.on_policy import OnPolicyCoarse
from callbacks.predictions_writer import PredictionsWriter
from callbacks.progress import StepRichProgressBar, StepTQDMProgressBar
from callbacks.refinement_trace import RefinementTrace
from callbacks.rng_state import RandomState
from callbacks.slurm_requeue import SlurmRequeue
from datamodules.annotation_source import (
    AnnotationSpec,
    JsonlSource,
    JsonlSpec,
    activitynet_source,
    charades_sta_source,
)
from datamodules.builtin import BuiltinSpec
from datamodules.builtin_source import BuiltinSource
from datamodules.datamodule import DataSource, GroundingDataModule
from grounding.answer_format.chat import answer_end_id
from grounding.answer_format.codec import AnswerCodec
from grounding.answer_format.corpus import tokenizer_corpus
from grounding.answer_format.prompts import render_prompt
from grounding.answer_format.targets import RefineSchedule
from lightning_modules.aux_head import AuxSpec
from lightning_modules.grounding_module import GroundingModule, InferenceSpec, OptimSpec
from lightning_modules.language_model import LMSpec, LoraSpec, build_language_model, grounding_token_ids
from lightning_modules.projector import ProjectorSpec
from lightning_modules.released_weights import InitFromSpec, load_released_heads
from lightning_modules.tokenizer import add_grounding_tokens, build_tokenizer
from lightning_modules.trainable import TrainableSpec, apply_trainable
from lightning_modules.video_llm import VideoLLM
from timerefine.pipeline.checkpoint_io import AtomicCheckpointIO
from timerefine.pipeline.config import ConfigError
from timerefine.pipeline.conventions import run_protocol, run_timeline
from timerefine.pipeline.init_from_run import start_from_run
from timerefine.pipeline.loggers import CSVResume, ResumableCSVLogger
from timerefine.pipeline.schema import from_node
from timerefine.pipeline.strategy import build_strategy

# data.name -> the source's factory and the spec dataclass naming the keys data.source may hold.
SOURCES = {
    "builtin": (BuiltinSource, BuiltinSpec),
    "charades_sta": (charades_sta_source, AnnotationSpec),
    "activitynet": (activitynet_source, AnnotationSpec),
    "jsonl": (JsonlSource, JsonlSpec),
}


def build_source(data: DictConfig) -> DataSource:
    if data.name not in SOURCES:
        raise ConfigError(f"data.name={data.name!r} is not a known dataset; choose from {sorted(SOURCES)}")
    (factory, spec), options = SOURCES[data.name], OmegaConf.to_container(data.source)
    accepted = {f.name for f in fields(spec)}
    unknown = sorted(set(options) - accepted)
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
        timeline=run_timeline(cfg),
        chat_template=cfg.data.chat_template,
        query_too_long=cfg.data.query_too_long,
    )


def refine_schedule(model: DictConfig) -> RefineSchedule:
    """``model.refine`` (``steps`` is K) as the one object every use of K reads."""
    return from_node(RefineSchedule, model.refine)


def build_tokenizer_for(
    cfg: DictConfig, datamodule: GroundingDataModule, schedule: RefineSchedule, tokenizer_dir: Path | None
) -> PreTrainedTokenizerBase:
    """The run's saved tokenizer when ``tokenizer_dir`` exists (resume, evaluation), else the
    pretrained one, else a local BPE trained on the training prompts and sample answers."""
    if (tokenizer_dir is None or not tokenizer_dir.is_dir()) and cfg.init_from_run:
        tokenizer_dir = Path(cfg.init_from_run) / "tokenizer"  # the run it starts from
    if tokenizer_dir is not None and tokenizer_dir.is_dir():
        return add_grounding_tokens(AutoTokenizer.from_pretrained(tokenizer_dir))
    train = datamodule.records("train")
    prompts = [render_prompt(datamodule.prompt_template, r.query) for r in train]
    corpus = tokenizer_corpus(prompts, [r.duration for r in train], schedule)
    lm = cfg.model.lm
    return build_tokenizer(
        lm.tokenizer or lm.name_or_path, corpus, lm.tokenizer_vocab_size, lm.grounding_tokens
    )


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
    """The tokenizer, the Video LLM and the answer codec that the module and the datamodule share."""
    model, timeline = cfg.model, run_timeline(cfg)
    schedule = refine_schedule(model)
    init_from = from_node(InitFromSpec, model.init_from)
    codec = answer_codec(cfg, build_tokenizer_for(cfg, datamodule, schedule, tokenizer_dir), schedule)
    lm_spec, trainable = from_node(LMSpec, model.lm), from_node(TrainableSpec, model.trainable)
    lora = from_node(LoraSpec, model.lora) if model.lora.enabled else None
    lm = build_language_model(
        codec.tokenizer,
        lm_spec.name_or_path,
        lm_spec.tiny,
        lora,
        lm_spec.dtype,
        lm_spec.gradient_checkpointing,
        init_from,
        lm_spec.token_rows_init,
        trainable.token_rows,
    )
    projector = from_node(ProjectorSpec, model.projector)
    video_llm = VideoLLM.from_config(
        lm,
        codec,
        projector=projector,
        aux=from_node(AuxSpec, model.aux),
        saliency_weight=model.saliency.weight,
        feature_dim=datamodule.source.feature_dim,
        num_frames=datamodule.source.num_frames,
        timeline=timeline,
    )
    load_released_heads(video_llm, init_from)
    module = GroundingModule(
        video_llm,
        codec,
        aux_weight=model.aux.weight,
        optim=from_node(OptimSpec, model.optim),
        inference=from_node(InferenceSpec, model.inference),
        saliency_weight=model.saliency.weight,
        config=OmegaConf.to_container(cfg, resolve=True),
        timeline=timeline,
        protocol=run_protocol(cfg),
    )
    if cfg.init_from_run:
        rows = grounding_token_ids(codec.tokenizer) if trainable.token_rows else []
        start_from_run(module, Path(cfg.init_from_run), model.lora.inherited, lora, rows)
    apply_trainable(video_llm, trainable)
    datamodule.attach(
        codec,
        datamodule.source.num_frames // projector.frames_per_token,
        max_positions=getattr(lm.config, "max_position_embeddings", None),
        answer_tokens=max(module.max_new_tokens, codec.answer_length() + 1),  # generated, or trained on
    )
    return module


def build_callbacks(cfg: DictConfig, output_dir: Path, schedule: RefineSchedule) -> list[Callback]:
    """The best checkpoint (first, so ``trainer.checkpoint_callback`` is it), ``last.ckpt`` every
    ``last_every_n_steps`` steps and on a crash, the random state in checkpoints, predictions,
    the CSV log's resume point, progress, lr, on-policy refinement (when ``schedule``, the module's,
    has coarse segments to start from), the refinement trace figure."""
    spec = cfg.callbacks
    callbacks: list[Callback] = [
        ModelCheckpoint(
            dirpath=output_dir / "checkpoints",
            filename="best-step{step}",
            auto_insert_metric_name=False,
            monitor=spec.checkpoint.monitor,
            mode=spec.checkpoint.mode,
            save_top_k=spec.checkpoint.save_top_k,
            enable_version_counter=False,  # a resumed run that validates a step again overwrites its file
        ),
        LastCheckpoint(output_dir / "checkpoints", spec.checkpoint.last_every_n_steps),
        RandomState(),
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
    if cfg.logger.csv:
        callbacks.append(CSVResume())
    if spec.lr_monitor and (cfg.logger.csv or cfg.logger.tensorboard):
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if spec.early_stopping:
        callbacks.append(EarlyStopping(**spec.early_stopping))
    if spec.get("refinement_trace", 0) > 0:  # absent from the config of older runs
        callbacks.append(RefinementTrace(output_dir / "refinement_trace", spec.refinement_trace))
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
    check_lightning_internals()
    on_slurm = SLURMEnvironment.detect()
    # Requeueing is done by callbacks.slurm_requeue at a step boundary, not in Lightning's handler.
    plugins: list = [AtomicCheckpointIO()] + ([SLURMEnvironment(auto_requeue=False)] if on_slurm else [])
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
