"""Compose the run config from conf/ with Hydra's compose API, and check overrides before running."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from timerefine.pipeline.schema import register_schemas

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


class ConfigError(ValueError):
    """A config that cannot run: unknown key, wrong type, bad value. The message says which."""


if not OmegaConf.has_resolver("now"):
    OmegaConf.register_new_resolver("now", lambda fmt: datetime.now().strftime(fmt), use_cache=True)


def _compose(overrides: list[str], name: str) -> DictConfig:
    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


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


def check_override_types(base: DictConfig, overrides: list[str]) -> None:
    """Reject ``key=value`` overrides whose value's type differs from the default's."""
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if override.is_sweep_override() or key in LIGHTNING_UNIONS or (CONF_DIR / key.split("@")[0]).is_dir():
            continue
        expected = OmegaConf.select(base, key, default=None, throw_on_missing=False)
        given = override.value()
        if isinstance(expected, (DictConfig, ListConfig)):
            expected = OmegaConf.to_container(expected)
        if not _compatible(expected, given):
            raise ConfigError(
                f"{key}={given!r}: expected {_type_name(expected)} (default {expected!r}), got {_type_name(given)}"
            )


def load_config(overrides: list[str], name: str = "train") -> DictConfig:
    """The composed, type-checked config; raises ConfigError with a one-line reason."""
    try:
        cfg = _compose(overrides, name)
        groups = [
            o for o in overrides if "." not in o.split("=", 1)[0] and (CONF_DIR / o.split("=", 1)[0]).is_dir()
        ]
        check_override_types(_compose(groups, name), overrides)
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(" ".join(str(error).split()) or repr(error)) from error
    return cfg
