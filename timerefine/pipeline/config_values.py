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

from lightning_modules.aux_head import AUX_LOSSES
from lightning_modules.language_model import TINY_ARCHITECTURES
from timerefine.answer_format.chat import CHAT_TEMPLATES
from timerefine.answer_format.codec import ANSWER_TOKENS
from timerefine.answer_format.predictions import FINAL_CHOICES
from timerefine.answer_format.prompts import template_error

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


def not_a_file(value: Any) -> str | None:
    """A directory that may not exist yet."""
    path = Path(str(value))
    return f"{path} exists and is not a directory" if path.exists() and not path.is_dir() else None


def tokenizer_source(value: Any) -> str | None:
    """A Hugging Face name, or a local folder that exists (a path is never looked up online)."""
    local = str(value).startswith((".", "/", "~"))
    return f"{value} is not a directory" if local and not Path(str(value)).expanduser().is_dir() else None


RULES: dict[str, Check] = {
    "seed": integer(0, 2**32 - 1),
    "output_dir": not_a_file,
    "data.batch_size": integer(1),
    "data.eval_batch_size": integer(1),
    "data.global_batch_size": optional(integer(1)),
    "data.num_workers": integer(0),
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
    "model.lm.tiny.arch": one_of(*sorted(TINY_ARCHITECTURES)),
    "model.lm.tiny.hidden_size": integer(1),
    "model.lm.tiny.num_layers": integer(1),
    "model.lm.tiny.num_heads": integer(1),
    "model.lm.tiny.intermediate_size": integer(1),
    "model.lm.tiny.max_positions": integer(1),
    "model.lm.tokenizer": optional(tokenizer_source),
    "model.lm.tokenizer_vocab_size": integer(1),
    "model.answer_tokens": one_of(*ANSWER_TOKENS),
    "model.lora.r": integer(1),
    "model.lora.alpha": POSITIVE,
    "model.lora.dropout": PROBABILITY,
    "model.lora.target_modules": items(lambda name: None if isinstance(name, str) else "must be a name", 1),
    "model.projector.kind": one_of("linear", "mlp"),
    "model.projector.frames_per_token": integer(1),
    "model.refine.steps": integer(0),
    "model.refine.noise_std": items(NON_NEGATIVE, 1),
    "model.refine.residual_std": optional(items(NON_NEGATIVE)),
    "model.refine.on_policy.fraction": PROBABILITY,
    "model.refine.on_policy.every_n_steps": integer(1),
    "model.refine.on_policy.num_samples": integer(1),
    "model.aux.weight": NON_NEGATIVE,
    "model.aux.loss": one_of(*AUX_LOSSES),
    "model.aux.head": one_of("linear", "mlp"),
    "model.inference.final": one_of(*FINAL_CHOICES),
    "model.inference.max_new_tokens": optional(integer(1)),
    "model.saliency.weight": NON_NEGATIVE,
    "model.optim.lr": POSITIVE,
    "model.optim.weight_decay": NON_NEGATIVE,
    "model.optim.warmup_steps": integer(0),
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
}

# (smaller, larger): the first may not exceed the second.
ORDERED = [
    ("data.source.min_duration", "data.source.max_duration"),
    ("data.source.min_events", "data.source.max_events"),
    ("data.source.min_event_fraction", "data.source.max_event_fraction"),
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
    for small, large in ORDERED:
        low, high = (OmegaConf.select(cfg, key, default=None) for key in (small, large))
        if _is_number(low) and _is_number(high) and low > high:
            errors.append(f"{small}={low} must not exceed {large}={high}")
    return errors
