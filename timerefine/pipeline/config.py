"""Compose the run config from conf/ with Hydra's compose API, and check overrides before running."""

from __future__ import annotations

import inspect
import tempfile
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import lightning as L
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from timerefine.pipeline.config_values import value_errors
from timerefine.pipeline.schema import register_schemas

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


class ConfigError(ValueError):
    """A config that cannot run: unknown key, wrong type, bad value. The message says which."""


_ABSENT = object()


if not OmegaConf.has_resolver("now"):
    OmegaConf.register_new_resolver("now", lambda fmt: datetime.now().strftime(fmt), use_cache=True)


def _compose(config_dir: Path, overrides: list[str], name: str) -> DictConfig:
    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir.resolve()), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def _is_group(config_dir: Path, key: str) -> bool:
    return (config_dir / key.split("@")[0]).is_dir()


# Groups whose default is no choice at all (``experiment: null`` in conf/train.yaml).
OPTIONAL_GROUPS = ("experiment",)


def _unset_null_groups(overrides: list[str], config_dir: Path) -> list[str]:
    """``experiment=null`` means no experiment (Hydra spells it ``~experiment``); any other group
    needs a choice."""
    kept = []
    for line, override in zip(overrides, OverridesParser.create().parse_overrides(overrides), strict=True):
        group = override.key_or_group
        if _is_group(config_dir, group) and override.value() is None and not override.is_delete():
            if group not in OPTIONAL_GROUPS:
                options = sorted(p.stem for p in (config_dir / group).glob("*.yaml"))
                raise ConfigError(f"{line}: {group} needs a choice: {', '.join(options)}")
            line = f"~{group}"
        kept.append(line)
    return kept


def _arguments(target: Callable, *set_by_build: str) -> frozenset[str] | None:
    """The keyword arguments a config mapping may add for ``target``; None: any (it takes ``**kwargs``)."""
    parameters = inspect.signature(target).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None
    return frozenset(parameters) - set(set_by_build)


# Mappings handed on as keyword arguments: a key added there with `+` is read when the callee takes it.
PASSED_ON: dict[str, tuple[str, frozenset[str] | None]] = {
    "trainer": (
        "lightning.Trainer",
        _arguments(
            L.Trainer, "default_root_dir", "use_distributed_sampler", "callbacks", "logger", "plugins"
        ),
    ),
    "trainer.strategy": (
        "FSDPStrategy",
        _arguments(FSDPStrategy, "auto_wrap_policy", "activation_checkpointing_policy", "use_orig_params"),
    ),
    "callbacks.early_stopping": ("EarlyStopping", _arguments(EarlyStopping)),
    "data.source.annotation_files": ("the annotation source", None),  # any split name
}


def unread(base: DictConfig, key: str) -> str | None:
    """Why no code would read ``key`` (not a key of ``base``, nor an argument a ``PASSED_ON`` mapping's
    reader takes), or None when something reads it."""
    if OmegaConf.select(base, key, default=_ABSENT, throw_on_missing=False) is not _ABSENT:
        return None
    parent, _, name = key.rpartition(".")
    reader, accepted = PASSED_ON.get(parent, ("", frozenset()))
    if accepted is None or name in accepted:
        return None
    takes = f" and {reader} takes no argument {name!r}" if reader else ""
    return f"not a config key{takes}, so nothing would read it"


def check_added_keys(base: DictConfig, overrides: list[Override], config_dir: Path = CONF_DIR) -> None:
    """Reject ``+key=value`` for a key that no code would read (a typo would silently change nothing),
    and ``~key``: code reads every key, so none can be removed."""
    for override in overrides:
        key = override.key_or_group
        if _is_group(config_dir, key):
            continue
        if override.is_delete():
            raise ConfigError(f"~{key}: keys cannot be removed; set a value instead (null where allowed)")
        if (override.is_add() or override.is_force_add()) and (reason := unread(base, key)):
            raise ConfigError(f"{key}: added with + but {reason}")


def unread_keys(saved: DictConfig, base: DictConfig, prefix: str = "") -> list[str]:
    """The keys of ``saved`` that no code would read, judged against ``base`` as :func:`unread`
    judges a ``+key``; a mapping where ``base`` holds a value (``trainer.strategy``) is its reader's."""
    keys = []
    for name, value in saved.items():
        key = f"{prefix}{name}"
        if unread(base, key):
            keys.append(key)
        elif isinstance(value, DictConfig) and isinstance(OmegaConf.select(base, key), DictConfig):
            keys.extend(unread_keys(value, base, f"{key}."))
    return keys


def _type_name(value: object) -> str:
    if isinstance(value, (DictConfig, dict)):
        return "mapping"
    if isinstance(value, (ListConfig, list)):
        return "list"
    return type(value).__name__


def _compatible(expected: object, given: object) -> bool:
    if expected is None or given is None:
        return True
    if isinstance(expected, bool) or isinstance(given, bool):
        return isinstance(expected, bool) and isinstance(given, bool)
    if isinstance(expected, float):
        return isinstance(given, (int, float))
    return _type_name(expected) == _type_name(given)


# Lightning accepts several types for these (int or float, count or list or "auto") and checks them itself.
LIGHTNING_UNIONS = {
    "trainer.devices",
    "trainer.strategy",
    "trainer.precision",
    "trainer.val_check_interval",
    "trainer.limit_train_batches",
    "trainer.limit_val_batches",
    "trainer.limit_test_batches",
    "trainer.gradient_clip_val",
}


def check_override_types(base: DictConfig, overrides: list[Override], config_dir: Path = CONF_DIR) -> None:
    """Reject ``key=value`` overrides whose value's type differs from the default's."""
    for override in overrides:
        key = override.key_or_group
        if override.is_sweep_override() or key in LIGHTNING_UNIONS or _is_group(config_dir, key):
            continue
        expected = OmegaConf.select(base, key, default=None, throw_on_missing=False)
        given = override.value()
        if isinstance(expected, (DictConfig, ListConfig)):
            expected = OmegaConf.to_container(expected)
        if not _compatible(expected, given):
            default = "" if isinstance(expected, dict) else f" (default {expected!r})"
            raise ConfigError(
                f"{key}={given!r}: expected {_type_name(expected)}{default}, got {_type_name(given)}"
            )


def load_config(overrides: list[str], name: str = "train", config_dir: Path = CONF_DIR) -> DictConfig:
    """The composed config, its overrides and values checked; raises ConfigError with a one-line reason.
    ``config_dir``/``name``: conf/train.yaml, or a run's saved config.yaml (evaluate.py)."""
    try:
        overrides = _unset_null_groups(overrides, config_dir)
        parsed = OverridesParser.create().parse_overrides(overrides)
        groups = [o.input_line for o in parsed if _is_group(config_dir, o.key_or_group)]
        base = _compose(config_dir, groups, name)
        check_added_keys(base, parsed, config_dir)
        check_override_types(base, parsed, config_dir)
        cfg = _compose(config_dir, overrides, name)
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(" ".join(str(error).split()) or repr(error)) from error
    errors = value_errors(cfg)
    if errors:
        raise ConfigError("; ".join(errors))
    return cfg


def with_schema_defaults(saved: DictConfig) -> DictConfig:
    """A run's saved config with the keys added to the schema since it was saved taking today's
    defaults for its dataset. A saved key that nothing reads is a ConfigError naming it."""
    dataset = OmegaConf.select(saved, "data.name", default=None)
    known = dataset is not None and (CONF_DIR / "data" / f"{dataset}.yaml").is_file()
    defaults = _compose(CONF_DIR, [f"data={dataset}"] if known else [], "train")
    if unknown := unread_keys(saved, defaults):
        raise ConfigError(f"{', '.join(sorted(unknown))}: not config keys, so nothing would read them")
    OmegaConf.set_struct(defaults, False)
    return OmegaConf.merge(defaults, saved)


def load_run_config(run_dir: Path, overrides: list[str]) -> DictConfig:
    """A run's saved ``config.yaml`` (evaluation, prediction, export), completed by
    :func:`with_schema_defaults`, then ``overrides`` checked as by :func:`load_config`."""
    saved = with_schema_defaults(OmegaConf.load(run_dir / "config.yaml"))
    with tempfile.TemporaryDirectory() as folder:
        OmegaConf.save(saved, Path(folder) / "config.yaml")
        return load_config(overrides, name="config", config_dir=Path(folder))
