"""Value checks of the composed config, in one table: counts, probabilities, lists, choices, paths.

Each check returns what is wrong with a value (``None`` when nothing is); a key absent from the
config (a dataset without that source key) is not checked.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from datamodules.datamodule import TOO_LONG
from grounding.answer_format.chat import CHAT_TEMPLATES
from grounding.answer_format.codec import ANSWER_TOKENS
from grounding.answer_format.predictions import FINAL_CHOICES
from grounding.answer_format.prompts import template_error
from grounding.answer_format.targets import OFFSET_SPACES, RESAMPLING
from grounding.answer_format.timeline import TIMELINES
from grounding.answer_format.tokens import TOKEN_STYLES
from grounding.metrics.protocols import PROTOCOLS
from grounding.metrics.windows import MULTI_WINDOW_MODES
from lightning_modules.aux_head import AUX_LOSSES, AUX_SCALINGS
from lightning_modules.grounding_module import DECODERS
from lightning_modules.language_model import TINY_ARCHITECTURES, TOKEN_ROWS_INITS
from lightning_modules.projector import TEMPORAL_EMBEDDINGS

INHERITED = ("continue", "merge")  # model.lora.inherited: what becomes of init_from_run's adapters
Check = Callable[[Any], "str | None"]
_ABSENT = object()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def integer(low: int, high: int | None = None) -> Check:
    """An int in [low, high]."""
    within = f">= {low}" if high is None else f"in [{low}, {high}]"

    def check(value: Any) -> str | None:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
        return None if ok and (high is None or value <= high) else f"must be an integer {within}"

    return check


def number(low: float, high: float = math.inf, open_low: bool = False, open_high: bool = False) -> Check:
    """A number between ``low`` and ``high``; an open end excludes the bound itself."""
    if high == math.inf:
        within = f"> {low}" if open_low else f">= {low}"
    else:
        within = f"in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"

    def check(value: Any) -> str | None:
        if not _is_number(value):
            return f"must be a number {within}"
        above = value > low if open_low else value >= low
        below = value < high if open_high else value <= high
        return None if above and below else f"must be a number {within}"

    return check


PROBABILITY = number(0, 1)
POSITIVE = number(0, open_low=True)
NON_NEGATIVE = number(0)


def optional(check: Check) -> Check:
    """``null`` or a value that passes ``check``."""
    return lambda value: None if value is None else check(value)


def items(check: Check, min_len: int = 0, max_len: int | None = None) -> Check:
    """A list of ``min_len`` to ``max_len`` values that each pass ``check``."""
    size = {0: "a list", 1: "a non-empty list"}.get(min_len, f"a list of at least {min_len} values")
    size = f"a list of {min_len} values" if min_len == max_len else size

    def check_list(value: Any) -> str | None:
        sized = isinstance(value, (list, ListConfig)) and len(value) >= min_len
        if not sized or (max_len is not None and len(value) > max_len):
            return f"must be {size}"
        wrong = [reason for reason in map(check, value) if reason]
        return f"every value {wrong[0]}" if wrong else None

    return check_list


def one_of(*choices: str) -> Check:
    return lambda value: None if value in choices else f"must be one of {', '.join(choices)}"


def key_names(value: Any) -> str | None:
    """A mapping of field names to the non-empty keys that name them in a file."""
    names = OmegaConf.to_container(value) if isinstance(value, DictConfig) else value
    if not isinstance(names, dict) or not all(isinstance(k, str) and k for k in names.values()):
        return "must map each field to a non-empty key"
    return None


def a_name(value: Any) -> str | None:
    """A non-empty string: a name or a path."""
    return None if isinstance(value, str) and value else "must be a non-empty name or path"


def not_a_file(value: Any) -> str | None:
    """A directory that may not exist yet."""
    path = Path(str(value))
    return f"{path} exists and is not a directory" if path.exists() and not path.is_dir() else None


def a_run_folder(value: Any) -> str | None:
    """A run's folder: its config.yaml and checkpoints/."""
    folder = Path(str(value))
    if not (folder / "config.yaml").is_file() or not (folder / "checkpoints").is_dir():
        return f"{folder} is not a run directory (config.yaml and checkpoints/)"
    return None


def tokenizer_source(value: Any) -> str | None:
    """A Hugging Face name, or a local folder that exists (a path is never looked up online)."""
    local = str(value).startswith((".", "/", "~"))
    return f"{value} is not a directory" if local and not Path(str(value)).expanduser().is_dir() else None


RULES: dict[str, Check] = {
    "seed": integer(0, 2**32 - 1),
    "output_dir": not_a_file,
    "init_from_run": optional(a_run_folder),
    "data.batch_size": integer(1),
    "data.eval_batch_size": integer(1),
    "data.global_batch_size": optional(integer(1)),
    "data.num_workers": integer(0),
    "data.timeline": one_of(*TIMELINES),
    "data.query_too_long": one_of(*TOO_LONG),
    "eval.protocol": one_of(*PROTOCOLS),
    "data.prompt_template": template_error,
    "data.chat_template": one_of(*CHAT_TEMPLATES),
    "data.source.num_train": integer(1),
    "data.source.num_val": integer(1),
    "data.source.num_test": integer(1),
    "data.source.num_frames": integer(1),
    "data.source.feature_dim": integer(1),
    "data.source.min_duration": POSITIVE,
    "data.source.max_duration": POSITIVE,
    "data.source.min_events": integer(1),
    "data.source.max_events": integer(1),
    "data.source.min_event_fraction": number(0, 1, open_low=True),
    "data.source.max_event_fraction": number(0, 1, open_low=True),
    "data.source.signal": NON_NEGATIVE,
    "data.source.noise": NON_NEGATIVE,
    "data.source.synthetic_noise": NON_NEGATIVE,
    "data.source.queries_per_video": integer(1),
    "data.source.features": one_of("synthetic", "folder", "packed"),
    "data.source.multi_window": one_of(*MULTI_WINDOW_MODES),
    "data.source.keys": key_names,
    "model.lm.tiny.arch": one_of(*sorted(TINY_ARCHITECTURES)),
    "model.lm.tiny.hidden_size": integer(1),
    "model.lm.tiny.num_layers": integer(1),
    "model.lm.tiny.num_heads": integer(1),
    "model.lm.tiny.intermediate_size": integer(1),
    "model.lm.tiny.max_positions": integer(1),
    "model.lm.tokenizer": optional(tokenizer_source),
    "model.lm.tokenizer_vocab_size": integer(1),
    "model.lm.grounding_tokens": one_of(*TOKEN_STYLES),
    "model.lm.token_rows_init": one_of(*TOKEN_ROWS_INITS),
    "model.answer_tokens": one_of(*ANSWER_TOKENS),
    "model.lora.r": integer(1),
    "model.lora.alpha": POSITIVE,
    "model.lora.dropout": PROBABILITY,
    "model.lora.target_modules": items(a_name, 1),
    "model.lora.inherited": one_of(*INHERITED),
    "model.init_from.projector": optional(a_name),
    "model.init_from.adapters": items(a_name),
    "model.init_from.added_tokens": items(a_name, 1),
    "model.projector.kind": one_of("linear", "mlp"),
    "model.projector.frames_per_token": integer(1),
    "model.projector.temporal_embedding": one_of(*TEMPORAL_EMBEDDINGS),
    "model.refine.steps": integer(0),
    "model.refine.noise_std": items(NON_NEGATIVE, 1),
    "model.refine.residual_std": optional(items(NON_NEGATIVE)),
    "model.refine.offset_space": one_of(*OFFSET_SPACES),
    "model.refine.resample": one_of(*RESAMPLING),
    "model.refine.on_policy.fraction": PROBABILITY,
    "model.refine.on_policy.every_n_steps": integer(1),
    "model.refine.on_policy.num_samples": integer(1),
    "model.aux.weight": NON_NEGATIVE,
    "model.aux.loss": one_of(*AUX_LOSSES),
    "model.aux.head": one_of("linear", "mlp"),
    "model.aux.scaling": one_of(*AUX_SCALINGS),
    "model.inference.final": one_of(*FINAL_CHOICES),
    "model.inference.max_new_tokens": optional(integer(1)),
    "model.inference.decoder": one_of(*DECODERS),
    "model.saliency.weight": NON_NEGATIVE,
    "model.optim.lr": POSITIVE,
    "model.optim.weight_decay": NON_NEGATIVE,
    "model.optim.warmup_steps": integer(0),
    "model.optim.warmup_ratio": number(0, 1, open_high=True),
    "model.optim.min_lr_ratio": PROBABILITY,
    "model.optim.betas": items(number(0, 1, open_high=True), 2, 2),
    "trainer.num_nodes": integer(1),
    "trainer.max_steps": integer(-1),
    "trainer.max_epochs": optional(integer(-1)),
    "trainer.log_every_n_steps": integer(1),
    "trainer.check_val_every_n_epoch": optional(integer(1)),
    "callbacks.checkpoint.mode": one_of("min", "max"),
    "callbacks.checkpoint.save_top_k": integer(-1),
    "callbacks.checkpoint.last_every_n_steps": integer(1),
    "callbacks.progress_bar": one_of("rich", "tqdm", "none"),
    "callbacks.refinement_trace": integer(0),
}

# (key, value, other key, the other's allowed values): settings that only work together.
REQUIRES = [
    ("model.aux.scaling", "reference", "model.aux.loss", ("l1",)),
    ("model.refine.offset_space", "seconds", "model.refine.residual_std", (None, [])),
    ("model.trainable.token_rows", False, "model.lora.enabled", (True,)),  # without LoRA the whole LM trains
]

# (smaller, larger): the first may not exceed the second.
ORDERED = [
    ("data.source.min_duration", "data.source.max_duration"),
    ("data.source.min_events", "data.source.max_events"),
    ("data.source.min_event_fraction", "data.source.max_event_fraction"),
]


def _frames_split_into_tokens(cfg: DictConfig) -> str | None:
    per_token = OmegaConf.select(cfg, "model.projector.frames_per_token", default=None)
    frames = OmegaConf.select(cfg, "data.source.num_frames", default=None)
    if isinstance(per_token, int) and per_token >= 1 and isinstance(frames, int) and frames % per_token:
        return f"model.projector.frames_per_token={per_token} must divide data.source.num_frames={frames}"
    return None


def _saliency_reads_the_query(cfg: DictConfig) -> str | None:
    weight = OmegaConf.select(cfg, "model.saliency.weight", default=0)
    conditioned = OmegaConf.select(cfg, "model.projector.query_conditioned", default=True)
    if _is_number(weight) and weight > 0 and not conditioned:
        return (
            f"model.saliency.weight={weight} needs model.projector.query_conditioned=true: without it a "
            "video token cannot know which query it is scored against"
        )
    return None


def _stored_features_have_a_path(cfg: DictConfig) -> str | None:
    features = OmegaConf.select(cfg, "data.source.features", default="synthetic")
    if features != "synthetic" and OmegaConf.select(cfg, "data.source.feature_path", default=None) is None:
        return f"data.source.features={features} needs data.source.feature_path (the folder or packed store)"
    return None


# Checks across keys: each returns what is wrong, or None.
CONSTRAINTS: list[Callable[[DictConfig], str | None]] = [
    _frames_split_into_tokens,
    _saliency_reads_the_query,
    _stored_features_have_a_path,
]


def _show(value: Any) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    return "null" if value is None else str(value)


def value_errors(cfg: DictConfig) -> list[str]:
    """One line per key whose value cannot run, naming the key and the value."""
    errors = []
    for key, check in RULES.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        reason = None if value is _ABSENT else check(value)
        if reason:
            errors.append(f"{key}={_show(value)}: {reason}")
    for key, value, other, allowed in REQUIRES:
        given = OmegaConf.select(cfg, key, default=None)
        needed = OmegaConf.select(cfg, other, default=None)
        needed = OmegaConf.to_container(needed) if isinstance(needed, ListConfig) else needed
        if given == value and needed not in allowed:
            choices = " or ".join(_show(a) for a in allowed)
            errors.append(f"{key}={value} needs {other}={choices}, got {_show(needed)}")
    for small, large in ORDERED:
        low, high = (OmegaConf.select(cfg, key, default=None) for key in (small, large))
        if _is_number(low) and _is_number(high) and low > high:
            errors.append(f"{small}={low} must not exceed {large}={high}")
    return errors + [reason for constraint in CONSTRAINTS if (reason := constraint(cfg))]
