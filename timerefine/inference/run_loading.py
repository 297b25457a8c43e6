"""Rebuild a trained run's model for inference: the one module that uses the model's internal API.

The module and the prompt collator are built from ``<run>/config.yaml`` and ``<run>/tokenizer`` with
``build_module`` as evaluate.py does, then given a checkpoint's weights (or an export's, see
export.py). No dataset is read: inference needs only the data's frame count and feature size.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch.plugins.precision import DoublePrecision, HalfPrecision, MixedPrecision, Precision
from omegaconf import DictConfig
from transformers import PreTrainedModel

from datamodules.collate import GroundingCollator
from grounding.answer_format.predictions import Prediction
from grounding.answer_format.prompts import query_error as prompt_query_error
from grounding.answer_format.prompts import query_length_error
from grounding.records import FeatureStore, GroundingRecord
from lightning_modules.base_weights import BaseWeightsError
from lightning_modules.grounding_module import GroundingModule
from timerefine.inference.video_features import InputError
from timerefine.pipeline.best_checkpoint import checkpoint_path, fitting_checkpoint
from timerefine.pipeline.build import build_datamodule, build_module
from timerefine.pipeline.config import ConfigError, load_run_config
from timerefine.pipeline.conventions import tiny_lm_width
from timerefine.pipeline.errors import INPUT_ERRORS
from timerefine.pipeline.precision import choose_precision, machine_capabilities
from timerefine.pipeline.resume import CheckpointError


@dataclass(frozen=True)
class ShapeOnlySource:
    """A data source that holds only the run's frame count and feature size."""

    name: str
    num_frames: int
    feature_dim: int

    def records(self, split: str) -> list[GroundingRecord]:
        raise RuntimeError("inference reads no dataset")

    annotations = records

    def store(self, split: str) -> FeatureStore:
        raise RuntimeError("inference reads no dataset")


@dataclass
class LoadedRun:
    """A run's model in eval mode, its prompt collator and config, and where the weights came from."""

    cfg: DictConfig
    module: GroundingModule
    collator: GroundingCollator
    weights: Path

    @property
    def num_frames(self) -> int:
        return int(self.cfg.data.source.num_frames)

    @property
    def feature_dim(self) -> int:
        return int(self.cfg.data.source.feature_dim)

    @property
    def language_model(self) -> PreTrainedModel:
        return self.module.model.lm

    @language_model.setter
    def language_model(self, lm: PreTrainedModel) -> None:
        self.module.model.lm = lm

    @property
    def precision(self) -> str:
        """The run's ``trainer.precision`` on the module's device here: ``auto`` is chosen for this
        machine as train.py and evaluate.py choose it, any other value is used as trained (but bf16
        autocast over float16 weights, which answers in fp32)."""
        requested = str(self.cfg.trainer.precision)
        device, width = self.module.device.type, tiny_lm_width(self.cfg)
        return choose_precision(
            requested, device, machine_capabilities, width, self.cfg.model.lm.dtype, answering=True
        ).precision

    @property
    def language_model_prefix(self) -> str:
        """What the language model's names start with in the module's state dict."""
        return "model.lm."


INFERENCE_KEYS = "model.inference."  # what answering may change: how answers are decoded and chosen


def run_config(folder: Path, overrides: Sequence[str] = ()) -> DictConfig:
    """The saved config of a run (or an export), with the checks of train.py, and ``overrides`` of
    ``model.inference.*`` keys (e.g. ``model.inference.final=aux``); InputError for any other key."""
    if not (folder / "config.yaml").is_file():
        raise InputError(f"{folder}: no config.yaml, so not a run directory or an exported model")
    overrides = [overrides] if isinstance(overrides, str) else list(overrides)  # one given as a text
    for override in overrides:
        if not override.lstrip("+~").startswith(INFERENCE_KEYS):
            raise InputError(
                f"{override}: answering can set only {INFERENCE_KEYS}* keys (evaluate.py sets the others "
                "an evaluation may change)"
            )
    try:
        cfg = load_run_config(folder, [])
    except ConfigError as err:
        raise InputError(str(err.of_file(folder / "config.yaml"))) from err
    try:  # an override's error is the override's, not the file's
        return load_run_config(folder, overrides) if overrides else cfg
    except ConfigError as err:
        raise InputError(str(err)) from err


def build_untrained(cfg: DictConfig, tokenizer_dir: Path) -> tuple[GroundingModule, GroundingCollator]:
    """The run's module (weights as initialised) and the collator that renders its prompts."""
    if not tokenizer_dir.is_dir():
        raise InputError(f"{tokenizer_dir}: missing (the run's tokenizer)")
    source = ShapeOnlySource(cfg.data.name, cfg.data.source.num_frames, cfg.data.source.feature_dim)
    try:
        datamodule = build_datamodule(cfg, tokenizer_dir, source)
        with torch.random.fork_rng(devices=[]):  # seeded as train.py and evaluate.py build it (on the CPU):
            torch.default_generator.manual_seed(cfg.seed)  # token_rows_init=resize's rows are frozen weights
            return build_module(cfg, datamodule, training=False).eval(), datamodule.collator
    except INPUT_ERRORS as err:  # the tokenizer, the LM's file (moved, damaged), released weights
        raise InputError(str(err)) from err


def run_checkpoint(run_dir: Path, ckpt: str) -> Path:
    """``best``, ``last`` or a path, as evaluate.py reads it; InputError when there is none."""
    try:
        return checkpoint_path(run_dir, ckpt)
    except (FileNotFoundError, CheckpointError) as err:
        raise InputError(str(err)) from err


def load_checkpoint(module: GroundingModule, path: Path, tokenizer_dir: Path) -> None:
    """Give ``module`` (its tokenizer read from ``tokenizer_dir``) the weights of a Lightning checkpoint
    (a file, or a sharded folder); the frozen base weights a checkpoint leaves out come from the
    rebuilt module. InputError when the file cannot be read, holds no weights that fit the run's
    model, was trained on other base weights, with another config or another tokenizer."""
    try:
        checkpoint = fitting_checkpoint(module, path, tokenizer_dir)
    except CheckpointError as error:
        raise InputError(str(error)) from error
    except BaseWeightsError as error:
        raise InputError(f"{path}: {error}") from error
    module.load_state_dict(checkpoint["state_dict"])


def load_run(
    run_dir: Path, ckpt: str = "best", device: str = "cpu", overrides: Sequence[str] = ()
) -> LoadedRun:
    """A trained run with the weights of its ``ckpt`` checkpoint (best, last or a path), answering
    with its ``model.inference`` settings changed by ``overrides`` (see :func:`run_config`)."""
    cfg = run_config(run_dir, overrides)
    path = run_checkpoint(run_dir, ckpt)
    module, collator = build_untrained(cfg, run_dir / "tokenizer")
    load_checkpoint(module, path, run_dir / "tokenizer")
    return in_run_precision(LoadedRun(cfg, module.to(device), collator, path))


def precision_plugin(precision: str, device_type: str) -> Precision:
    """Lightning's plugin for a ``trainer.precision``, as evaluate.py's Trainer runs it: what it does
    to the weights (``*-true`` casts them), to a batch's floats and to each forward pass (autocast)."""
    if precision.endswith("-mixed"):
        return MixedPrecision(precision, device_type)
    if precision in ("bf16-true", "16-true"):
        return HalfPrecision(precision)
    return DoublePrecision() if precision == "64-true" else Precision()


def in_run_precision(run: LoadedRun) -> LoadedRun:
    """``run`` with its weights in the dtype its precision keeps them in (``*-true``: that dtype)."""
    run.module = precision_plugin(run.precision, run.module.device.type).convert_module(run.module)
    return run


def query_error(run: LoadedRun, query: str) -> str | None:
    """Why ``query`` cannot fill the prompt (it holds ``<video>`` or a special token's text), or with
    it, the video and the longest answer do not fit the run's language model; None when it fits (or
    the model states no limit)."""
    if error := prompt_query_error(query):
        return error
    if error := run.collator.special_token_error(query):
        return error
    limit = getattr(run.language_model.config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None
    others = len(run.collator.prompt_ids(""))
    query_tokens = len(run.collator.prompt_ids(query)) - others
    return query_length_error(query_tokens, others + run.module.max_new_tokens, limit)


def predict(run: LoadedRun, features: torch.Tensor, queries: list[str]) -> list[Prediction]:
    """Greedy answers (frame indices) for ``queries``; ``features`` is ``(len(queries), frames, dim)``."""
    prompts = [run.collator.prompt_ids(query) for query in queries]
    width = max(len(prompt) for prompt in prompts)
    ids = torch.full((len(prompts), width), run.module.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):  # left-padded, as the collator pads prompts for generation
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    device = run.module.device
    batch = {"prompt_ids": ids.to(device), "prompt_mask": mask.to(device), "features": features.to(device)}
    plugin = precision_plugin(run.precision, device.type)
    with plugin.forward_context():
        return run.module.predict_batch(plugin.convert_input(batch))


def dataset_examples(cfg: DictConfig, split: str = "test") -> Iterator[tuple[GroundingRecord, FeatureStore]]:
    """The run's own ``split`` queries with their feature store (raises when the data is not here)."""
    datamodule = build_datamodule(cfg)
    records = datamodule.records(split)
    store = datamodule.source.store(split)
    return ((record, store) for record in records)
