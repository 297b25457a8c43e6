"""Compose the run config from conf/ with Hydra's compose API on the typed schema (schema.py), and
check what OmegaConf does not: the spec dataclasses' rules, and keys added with ``+``."""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import lightning as L
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException
from torch.distributed.fsdp import FullyShardedDataParallel

from grounding.checks import SpecError
from timerefine.pipeline.schema import register_schemas
from timerefine.pipeline.training_rules import unread_settings

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


_ABSENT = object()


class ConfigError(ValueError):
    """A config that cannot run: unknown key, wrong type, bad value. The message says which."""

    def of_file(self, path: Path | str) -> ConfigError:
        """This error naming ``path``, the file that holds the config (once)."""
        return self if str(path) in str(self) else ConfigError(f"{path}: {self}")


if not OmegaConf.has_resolver("now"):
    OmegaConf.register_new_resolver("now", lambda fmt: datetime.now().strftime(fmt), use_cache=True)


def _compose(config_dir: Path, overrides: list[str], name: str) -> DictConfig:
    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir.resolve()), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def group_options(config_dir: Path = CONF_DIR) -> dict[str, list[str]]:
    """Each config group (a folder of conf/) and its options."""
    return {
        d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in sorted(config_dir.iterdir()) if d.is_dir()
    }


# Mappings handed on as keyword arguments, less the arguments the builder sets itself (from what): a
# key added there with `+` is read when the callee takes it.
PASSED_ON: dict[str, tuple[Callable, dict[str, str]]] = {
    "trainer": (
        L.Trainer,
        {
            "default_root_dir": "output_dir",
            "use_distributed_sampler": "the datamodule (it shards by rank)",
            "callbacks": "callbacks.*",
            "logger": "logger.*",
            "plugins": "the cluster it finds",
        },
    ),
    "trainer.strategy": (
        FSDPStrategy,
        {
            "auto_wrap_policy": "auto_wrap",
            "activation_checkpointing_policy": "activation_checkpointing",
            "use_orig_params": "the project (always true: frozen and trained parameters mix)",
        },
    ),
    "callbacks.early_stopping": (EarlyStopping, {}),
    "data.source.annotation_files": (lambda **splits: None, {}),  # any split name
}
KWARGS_PASSED_TO: dict[Callable, Callable] = {FSDPStrategy: FullyShardedDataParallel}


def unread(base: DictConfig, key: str) -> str | None:
    """Why no code would read ``key``: not a key of ``base``, nor an argument that the reader of a
    ``PASSED_ON`` mapping takes; None when something reads it."""
    if OmegaConf.select(base, key, default=_ABSENT, throw_on_missing=False) is not _ABSENT:
        return None
    parent, _, name = key.rpartition(".")
    if parent not in PASSED_ON:
        return "not a config key, so nothing would read it"
    target, set_by_build = PASSED_ON[parent]
    if name in set_by_build:
        return f"{target.__name__}'s {name} is set from {set_by_build[name]}, so this would not be read"
    readers: list[Callable] = [target]  # each passes the arguments it does not take on to the next
    while (arguments := inspect.signature(readers[-1]).parameters.values()) and all(
        p.name != name for p in arguments
    ):
        if not any(p.kind is p.VAR_KEYWORD for p in arguments):
            names = [reader.__name__ for reader in readers]
            takers = f"neither {' nor '.join(names)} takes an" if len(names) > 1 else f"{names[0]} takes no"
            return f"not a config key and {takers} argument {name!r}, so nothing would read it"
        if (passed_to := KWARGS_PASSED_TO.get(readers[-1])) is None:
            return None
        readers.append(passed_to)
    return None


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


SWEEPS = "sweeps run through timerefine-ablate (--variant, --seeds) or timerefine-slurm-submit (a job array)"


def _checked(line: str, override: Override, groups: dict[str, list[str]]) -> str:
    """``line`` as Hydra takes it, or a ConfigError for what Hydra would take wrongly: ``~key`` (code
    reads every key, so none can be removed), a group set to null (only ``experiment=null``, no
    experiment, which Hydra spells ``~experiment``), a sweep (Hydra's advice, ``--multirun``, is no
    option here), a key of Hydra's own (``hydra.run.dir``: nothing here reads them)."""
    if override.key_or_group.split("/")[0].split(".")[0] == "hydra":
        raise ConfigError(
            f"{line}: Hydra's own settings are not read here (the config is composed without Hydra's "
            "runner); the run's folder is output_dir"
        )
    if override.is_sweep_override():
        raise ConfigError(
            f"{line}: a sweep, and a run takes one value (a list is key=[a,b]; text with a comma is "
            f"quoted); {SWEEPS}"
        )
    group = override.key_or_group.split("@")[0]
    if group not in groups and override.is_delete():
        raise ConfigError(f"~{group}: keys cannot be removed; set a value instead (null where allowed)")
    if group in groups and group != "experiment" and override.is_delete():
        raise ConfigError(f"~{group}: {group} needs a choice: {', '.join(groups[group])}")
    if group in groups and override.value() is None and not override.is_delete():
        if group != "experiment":
            raise ConfigError(f"{line}: {group} needs a choice: {', '.join(groups[group])}")
        return f"~{group}"
    return line


def quoted(value: str) -> str:
    """``value`` as one quoted Hydra override value, whatever it holds (``[``, ``=``, ``,``, ``'``)."""
    escaped = value.replace("'", "\\'")
    return f"'{escaped}'"


def override_key(override: str) -> str:
    """The key an override sets, adds or removes: ``a.b`` of ``+a.b=1`` and ``~a.b``."""
    return override.partition("=")[0].lstrip("+~")


def idle_settings(cfg: DictConfig, overrides: list[str]) -> Iterator[str]:
    """The keys set by ``overrides`` that nothing reads, the other settings being as they are: warned
    of, not refused (a sweep over K = 0, 1, 2 may give every K the aux weight)."""
    given = {override_key(override) for override in overrides}
    for key, why in unread_settings(cfg).items():
        if key in given:
            yield f"{key}={OmegaConf.select(cfg, key)} is not read: {why}"


def check_overrides(base: DictConfig, overrides: list[Override], groups: dict[str, list[str]]) -> None:
    """What OmegaConf lets through, judged against ``base`` (the config before the overrides): ``+key``
    for a key that no code would read (a typo would silently change nothing), and a value that is not
    true or false for a boolean key (OmegaConf reads 1 as true)."""
    for override in overrides:
        key = override.key_or_group
        if key.split("@")[0] in groups and not isinstance(override.value(), dict):  # a choice, not values
            continue
        if (override.is_add() or override.is_force_add()) and (reason := unread(base, key)):
            raise ConfigError(f"{key}: added with + but {reason}")
        if not_boolean := _not_boolean(base, key, override.value()):
            raise ConfigError(f"{not_boolean}: must be true or false")


def _not_boolean(base: DictConfig, key: str, value: object) -> str | None:
    """``key=value`` of the first boolean key of ``base`` that ``value`` (a mapping: its keys, nested)
    sets to something other than true or false; None when there is none."""
    if isinstance(value, dict):
        return next(
            (bad for name, v in value.items() if (bad := _not_boolean(base, f"{key}.{name}", v))), None
        )
    is_boolean = isinstance(OmegaConf.select(base, key, default=None), bool)
    return f"{key}={value}" if is_boolean and not isinstance(value, bool) else None


def spec_errors(node: DictConfig, at: str = "") -> list[str]:
    """What the spec dataclasses of ``node`` and below refuse, innermost first, each line naming the
    full key."""
    errors = [
        e
        for key, child in node.items()
        if isinstance(child, DictConfig)
        for e in spec_errors(child, f"{at}{key}.")
    ]
    if errors or not dataclasses.is_dataclass(OmegaConf.get_type(node)):
        return errors
    try:
        OmegaConf.to_object(node)
    except SpecError as error:
        return [at + line for line in error.lines]
    return []


COMPOSED_KEY_ERROR = re.compile(
    r"In '(\w+)/([^']+)': ConfigKeyError raised while composing config: (.+?) full_key: (\S+)"
)
UNKNOWN_OPTION = re.compile(
    r"Could not find '([^']+)' Available options in '([^']+)': (.*?) Config search path"
)


def _one_line(error: Exception, overrides: list[Override]) -> str:
    """Hydra's message names the override; OmegaConf's, its cause, says what is wrong with it."""
    text, cause = " ".join(str(error).split()), error.__cause__
    keys = [o.key_or_group for o in overrides if o.key_or_group in text]
    data = next((str(o.value()) for o in overrides if o.key_or_group == "data"), None)
    chosen = COMPOSED_KEY_ERROR.match(text)
    if chosen and data and chosen[4].startswith("data."):  # an experiment made for other data
        return f"{chosen[1]}={chosen[2]} sets {chosen[4]}, which data={data} lacks ({chosen[3]})"
    if chosen:  # a typo in a config file
        return f"{chosen[1]}={chosen[2]} sets {chosen[4]}, which is not a config key ({chosen[3]})"
    if unknown := UNKNOWN_OPTION.search(text):  # without Hydra's search path
        group, options = unknown[2], ", ".join(unknown[3].split())
        return f"{group}={unknown[1].removeprefix(group + '/')}: no such option; the options: {options}"
    if keys and isinstance(cause, OmegaConfBaseException) and getattr(cause, "msg", None):
        return f"{max(keys, key=len)}: {cause.msg.splitlines()[0]}"
    return text.split(" Config search path:")[0] or repr(error)


def composed_config(overrides: list[str], name: str = "train", config_dir: Path = CONF_DIR) -> DictConfig:
    """The composed config, its overrides and types checked, not yet its values' rules
    (:func:`checked_values`); raises ConfigError with a one-line reason."""
    parsed: list[Override] = []
    groups = group_options(config_dir)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        lines = [_checked(line, o, groups) for line, o in zip(overrides, parsed, strict=True)]
        choices = [
            line for line, o in zip(lines, parsed, strict=True) if o.key_or_group.split("@")[0] in groups
        ]
        check_overrides(_compose(config_dir, choices, name), parsed, groups)
        cfg = _compose(config_dir, lines, name)
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(_one_line(error, parsed)) from error
    if missing := sorted(OmegaConf.missing_keys(cfg)):
        raise ConfigError(f"{', '.join(missing)}: no value given (???); set one")
    return cfg


def checked_values(cfg: DictConfig) -> DictConfig:
    """``cfg``, whose values the spec dataclasses accept; ConfigError naming each key they refuse."""
    if errors := spec_errors(cfg):
        raise ConfigError("; ".join(errors))
    return cfg


def load_config(overrides: list[str], name: str = "train", config_dir: Path = CONF_DIR) -> DictConfig:
    """The composed config, its overrides and values checked; raises ConfigError with a one-line reason."""
    return checked_values(composed_config(overrides, name, config_dir))


# Keys added (or required) with a default that changes what a run does, and the value a run saved
# before them ran with, where their mapping is one (callbacks.early_stopping may be null) and the
# run's other settings read them (a reference-style run has no <video> token to fold whitespace into).
UNTIL_ADDED = {
    "model.saliency.projector_steps": 0,
    "callbacks.early_stopping.mode": "min",
    "model.lm.video_whitespace": "folded",
    "grpo.disable_dropout": False,
}


def with_schema_defaults(saved: DictConfig) -> DictConfig:
    """A run's saved config on today's schema, the keys added since it was saved taking today's
    defaults for its dataset (those of ``UNTIL_ADDED`` that it reads the value it ran with). A saved key that
    nothing reads, or a value of the wrong type, is a ConfigError naming it."""
    dataset = OmegaConf.select(saved, "data.name", default=None)
    known = dataset is not None and (CONF_DIR / "data" / f"{dataset}.yaml").is_file()
    run = _compose(CONF_DIR, [f"data={dataset}"] if known else [], "train")
    if unknown := unread_keys(saved, run):
        raise ConfigError(f"{', '.join(sorted(unknown))}: not config keys, so nothing would read them")
    try:
        with open_dict(run), open_dict(run.trainer):  # the mappings passed on may hold more keys
            run.merge_with(saved)
    except OmegaConfBaseException as error:
        raise ConfigError(_one_line(error, [])) from error
    idle = unread_settings(run)
    for key, value in UNTIL_ADDED.items():
        mapping = isinstance(OmegaConf.select(run, key.rpartition(".")[0]), DictConfig)
        if mapping and key not in idle and OmegaConf.select(saved, key, default=_ABSENT) is _ABSENT:
            OmegaConf.update(run, key, value, force_add=True)
    return run


def saved_config(path: Path) -> DictConfig:
    """A run's saved ``config.yaml`` as written; ConfigError naming it when it is not YAML, empty, or
    not a mapping of keys (a run killed while writing it, a file of something else)."""
    try:
        saved = OmegaConf.load(path)
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not a run's config ({' '.join(str(error).split())})") from error
    if not isinstance(saved, DictConfig) or not saved:
        raise ConfigError(f"{path}: not a run's config (empty, or not a mapping of keys)")
    return saved


def composed_run_config(run_dir: Path, overrides: list[str]) -> DictConfig:
    """A run's saved ``config.yaml`` completed by :func:`with_schema_defaults`, with ``overrides``
    composed as by :func:`composed_config` (their values' rules not yet checked). A config group
    (``data=charades_sta``) is refused: the saved config has no defaults list to choose from."""
    groups = group_options()
    if chosen := [o for o in overrides if override_key(o).split("@")[0] in groups]:
        raise ConfigError(
            f"{chosen[0]}: a run's saved config takes keys, not config groups (a group would redo what "
            "the run was made of); set the keys that differ, e.g. data.source.root=..."
        )
    ConfigStore.instance().store(
        name="saved_run", node=with_schema_defaults(saved_config(run_dir / "config.yaml"))
    )
    return composed_config(overrides, name="saved_run")


def load_run_config(run_dir: Path, overrides: list[str]) -> DictConfig:
    """A run's saved ``config.yaml`` (evaluation, prediction, export), completed by
    :func:`with_schema_defaults`, then ``overrides`` checked as by :func:`load_config`."""
    return checked_values(composed_run_config(run_dir, overrides))
