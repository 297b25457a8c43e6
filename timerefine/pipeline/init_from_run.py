"""``init_from_run=<run dir>``: a run that starts where another one ended.

It takes the other run's settings of what its weights are (``model.*`` and the data keys of
``run_identity.IDENTITY``: timeline, prompt, chat format, frames, feature size; and what its features
mean, ``run_identity.feature_keys``: ``data.source.features`` and the seed generated ones are drawn
from; ``run_identity.inherited_identity`` says which; those given on the command line still apply on
top, each change logged) but no projector steps (its projector has trained; 0 unless
``model.saliency.projector_steps`` is given), its tokenizer (``model.lm.tokenizer*`` cannot change), and
the weights of its best checkpoint (its last without one: a run that never validated): LoRA
adapters, token rows, projector, heads. ``model.lora.inherited`` (this run's own, not taken from the
other's) says what becomes of the adapters:
``continue`` trains the same ones on (the official TimeRefine recipe's second stage; their rank, scale
and place cannot change), ``merge`` merges them into the LM at their own settings and trains new ones
with ``model.lora``'s (with ``model.lora.enabled=false`` none: the merged LM trains whole). Every build of the run (training, resuming, evaluation) starts
from the other run again, and from the runs of its chain whose merged adapters its base holds, so their
folders must stay where they are.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf
from peft import PeftModel
from transformers import PreTrainedModel

from lightning_modules.grounding_module import GroundingModule
from lightning_modules.language_model import LoraSpec, apply_lora
from timerefine.pipeline.best_checkpoint import NoBestCheckpoint, checkpoint_path, fitting_checkpoint
from timerefine.pipeline.config import (
    ConfigError,
    checked_values,
    composed_config,
    load_run_config,
    spec_errors,
)
from timerefine.pipeline.config_diff import show
from timerefine.pipeline.resume import CheckpointError
from timerefine.pipeline.run_identity import FEATURES, IDENTITY, SEED, feature_keys, inherited_identity, under
from timerefine.pipeline.schema import INHERITED, a_run_folder

log = logging.getLogger(__name__)
PROJECTOR_STEPS = "model.saliency.projector_steps"
ADAPTER_SHAPE = ("r", "alpha", "target_modules")  # model.lora keys that say what trained adapters compute
TOKENIZER_KEYS = ("model.lm.tokenizer", "model.lm.tokenizer_vocab_size", "model.lm.grounding_tokens")
INHERITED_KEY = "model.lora.inherited"  # the run's own start, not taken from init_from_run's
BASE_KEYS = ("name_or_path", "weights", "tiny", "dtype")  # model.lm keys a rebuilt base LM is made of


class RunStartError(ValueError):
    """A run to start from whose checkpoint does not fit the model; names the checkpoint and the key."""


def _given(key: str, overrides: list[str]) -> list[tuple[str, object]]:
    """The ``key`` or ``key.*`` values set on the command line, in order."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [
        (o.key_or_group, o.value())
        for o in parsed
        if o.key_or_group == key or o.key_or_group.startswith(f"{key}.")
    ]


# The keys a start may set (IDENTITY and the feature keys), whose refusals wait until it is read.
START_MAY_SET = (*IDENTITY, FEATURES, SEED)


def start_config(cfg: DictConfig) -> DictConfig:
    """The config of ``cfg``'s ``init_from_run``; ConfigError naming it when it cannot be read."""
    try:
        return load_run_config(Path(cfg.init_from_run), [])
    except ConfigError as error:
        raise ConfigError(f"init_from_run={cfg.init_from_run}: {error}") from error


def train_config(overrides: list[str]) -> DictConfig:
    """The config that train.py runs: composed, with ``init_from_run``'s settings, then checked; a
    stage's ``model.*`` keys are judged with its run's settings, not with the defaults they replace."""
    return inherit_settings(composed_config(overrides), overrides)


def inherit_settings(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """``cfg`` with ``init_from_run``'s identity settings, then the ones ``overrides`` give; the
    result checked as load_config checks a config. Raises ConfigError."""
    if cfg.init_from_run is None:
        return checked_values(cfg)
    if reason := a_run_folder(cfg.init_from_run):  # with the refusals that no start would change
        keys = {line: re.split(r"[=: ]", line, maxsplit=1)[0] for line in spec_errors(cfg)}
        others = [line for line, key in keys.items() if not under(key, ("init_from_run", *START_MAY_SET))]
        raise ConfigError("; ".join([f"init_from_run={cfg.init_from_run}: {reason}", *others]))
    if any(key == "model" for key, _ in _given("model", overrides)):
        raise ConfigError(
            "model=...: init_from_run takes its run's model settings; change single model.* keys"
        )
    run_dir, run = Path(cfg.init_from_run), start_config(cfg)
    own_start = cfg.model.lora.inherited  # what becomes of its adapters is this run's, not the run's
    for key, value in inherited_identity(run, cfg).items():
        OmegaConf.update(cfg, key, value, merge=False)
    OmegaConf.update(cfg, INHERITED_KEY, own_start)
    for key in (*IDENTITY, *feature_keys(run)):
        for given, value in _given(key, overrides):
            OmegaConf.update(cfg, given, value, merge=False)
            trained = OmegaConf.select(run, given, default=None)
            if given != INHERITED_KEY and trained != OmegaConf.select(cfg, given):  # its own start
                log.warning(
                    "init_from_run=%s trained with %s=%s; this run sets %s",
                    run_dir,
                    given,
                    show(trained),
                    show(value),
                )
    for key in TOKENIZER_KEYS:  # the run's tokenizer/ is this run's: its token rows mean its tokens
        if (given := OmegaConf.select(cfg, key)) != (trained := OmegaConf.select(run, key)):
            raise ConfigError(
                f"{key}={show(given)}: a run started from init_from_run={run_dir} uses its tokenizer "
                f"({run_dir / 'tokenizer'}, {key}={show(trained)})"
            )
    steps = OmegaConf.select(cfg, PROJECTOR_STEPS)
    if not _given(PROJECTOR_STEPS, overrides):
        OmegaConf.update(cfg, PROJECTOR_STEPS, 0)
    elif 0 < cfg.trainer.max_steps <= steps and not cfg.grpo.enabled:  # GRPO: checked_values refuses any
        raise ConfigError(
            f"trainer.max_steps={cfg.trainer.max_steps} leaves no step for the LM after {PROJECTOR_STEPS}={steps}"
        )
    check_continued_adapters(run, cfg)
    if run.data.name != cfg.data.name:  # a later stage on other data is a recipe; a forgotten data= is not
        log.warning(
            "init_from_run=%s trained on data.name=%s; this run reads %s",
            cfg.init_from_run,
            run.data.name,
            cfg.data.name,
        )
    return checked_values(cfg)


def check_continued_adapters(run: DictConfig, cfg: DictConfig) -> None:
    """ConfigError when the adapters of ``init_from_run`` (``run``: its config), trained on
    (``inherited=continue``), would get another rank, scale or place than they were trained with: their
    weights would compute something else; would be trained on without LoRA (``model.lora.enabled=false``),
    which has no place for them; or would train token rows they were made without (held ones may freeze)."""
    trained, given, start = run.model.lora, cfg.model.lora, f"init_from_run={cfg.init_from_run}"
    if given.inherited != "continue":
        return
    if trained.enabled and cfg.model.trainable.token_rows and not start_token_rows(cfg, run):
        raise ConfigError(
            f"model.trainable.token_rows=true: the adapters of {start} were trained without their token "
            "rows (model.trainable.token_rows=false) and model.lora.inherited=continue trains them on; set "
            "model.lora.inherited=merge for new adapters that train them"
        )
    if not trained.enabled:
        if given.enabled:
            raise ConfigError(
                f"model.lora.enabled=true: the LM of {start} was trained without LoRA, so model.lora.inherited="
                "continue has no adapters to train on; set model.lora.inherited=merge for new ones"
            )
        return
    if not given.enabled:
        raise ConfigError(
            f"model.lora.enabled=false: the adapters of {start} were trained with LoRA and "
            "model.lora.inherited=continue trains them on, which needs model.lora.enabled=true; set "
            "model.lora.inherited=merge to merge them into the LM and train it without LoRA"
        )
    for key in ADAPTER_SHAPE:
        if given[key] != trained[key]:
            raise ConfigError(
                f"model.lora.{key}={show(given[key])}: the adapters of {start} were trained with "
                f"{key}={show(trained[key])} and model.lora.inherited=continue trains them on; set "
                "model.lora.inherited=merge for new adapters"
            )


def starting_lora(cfg: DictConfig, lora: LoraSpec | None) -> LoraSpec | None:
    """The adapters the model is built with: ``init_from_run``'s own when they merge (new ``lora`` go on
    after, :func:`start_from_run`), else ``lora``."""
    if not cfg.init_from_run or cfg.model.lora.inherited != "merge":
        return lora
    trained = OmegaConf.to_object(start_config(cfg).model.lora)
    return trained if trained.enabled else None


def held_token_rows(run: DictConfig) -> bool:
    """Whether the adapters of the run configured by ``run`` hold token rows, trained or frozen: those
    of the adapters it continued, else as its ``model.trainable.token_rows`` says."""
    if run.init_from_run and run.model.lora.inherited == "continue":
        return start_token_rows(run, start_config(run))
    return run.model.trainable.token_rows


def start_token_rows(cfg: DictConfig, start: DictConfig) -> bool:
    """Whether the adapters of ``init_from_run`` (``start``: its config) hold token rows
    (:func:`held_token_rows`)."""
    try:
        return held_token_rows(start)
    except ConfigError as error:
        raise ConfigError(f"init_from_run={cfg.init_from_run}: {error}") from error


def starting_token_rows(cfg: DictConfig) -> bool:
    """Whether the adapters the model is built with hold token rows: as those of ``init_from_run``,
    whose checkpoint holds the rows or not (this run's ``token_rows=false`` then freezes them,
    ``apply_trainable``; new adapters after a merge take its own setting), else as ``cfg`` says."""
    if not cfg.init_from_run:
        return cfg.model.trainable.token_rows
    return start_token_rows(cfg, start_config(cfg))


def merged_base(cfg: DictConfig, started: Callable[[DictConfig], GroundingModule]) -> PreTrainedModel | None:
    """The base LM of ``init_from_run`` when it holds adapters merged in its chain of starts (a LoRA
    run on a pretrained LM leaves its base out of its checkpoints): rebuilt as that run built it
    (``started``: a run's module built and started from its own ``init_from_run``), merging what it
    merged (``model.lora.inherited=merge``) or taking the base of the run it continued; None when that
    base is the pretrained LM, or when its checkpoints hold the whole LM. The base keeps the run's
    ``BASE_KEYS`` (ConfigError for another value) and takes ``cfg``'s gradient checkpointing."""
    if not cfg.init_from_run:
        return None
    run_dir, run = Path(cfg.init_from_run), start_config(cfg)
    lora, lm = run.model.lora, OmegaConf.to_object(run.model.lm)
    if not (run.init_from_run and lora.enabled and lm.base):
        return None
    for key in BASE_KEYS:
        if (given := cfg.model.lm[key]) != (trained := run.model.lm[key]):
            raise ConfigError(
                f"model.lm.{key}={show(given)}: the base LM of init_from_run={run_dir} holds merged "
                f"adapters and is rebuilt as it was built, with model.lm.{key}={show(trained)}"
            )
    try:
        if lora.inherited == "continue":
            return merged_base(run, started)
        log.info(
            "init_from_run=%s merged the adapters of %s: rebuilding its base LM", run_dir, run.init_from_run
        )
        OmegaConf.update(run, "model.lm.gradient_checkpointing", False)  # this run's own setting applies
        language_model = started(run).model.lm
    except (RunStartError, ConfigError, FileNotFoundError) as error:
        raise type(error)(f"init_from_run={run_dir}: {error}") from error
    return language_model.unload()  # its own adapters come from its checkpoint, onto this run's


def start_from_run(
    module: GroundingModule, run_dir: Path, inherited: str, lora: LoraSpec | None, token_ids: list[int]
) -> None:
    """Load the best checkpoint of ``run_dir`` into ``module`` (built with the run's settings); with
    ``merge``, merge its adapters into the LM and put new ``lora`` adapters (with ``token_ids``' rows
    training) on it, or none when ``lora`` is None (the merged LM trains whole)."""
    if inherited not in INHERITED:
        raise ValueError(f"inherited={inherited!r}: choose from {', '.join(INHERITED)}")
    try:
        path = checkpoint_path(run_dir, "best")
    except NoBestCheckpoint:  # it never validated: its last weights are all it has
        path = checkpoint_path(run_dir, "last")
        log.info("init_from_run=%s records no best checkpoint (no validation): its last one, then", run_dir)
    except FileNotFoundError as error:
        raise RunStartError(f"init_from_run={run_dir}: {error}") from error
    log.info("init_from_run=%s: starting from %s", run_dir, path)
    if not (run_dir / "metrics.json").is_file():
        log.warning("init_from_run=%s has not finished (no metrics.json): it may have been stopped", run_dir)
    try:
        checkpoint = fitting_checkpoint(module, path, run_dir / "tokenizer", same_config=False)
    except CheckpointError as error:
        raise RunStartError(f"init_from_run={run_dir}: {error}") from error
    module.load_state_dict(checkpoint["state_dict"])
    if inherited != "merge":
        return
    lm = module.model.lm
    if isinstance(lm, PeftModel):
        lm = lm.merge_and_unload()
    elif lora is None:  # no adapters to merge, none to put on
        return
    if lora is None:  # peft froze the base weights; without adapters the LM trains whole, as built fresh
        lm.requires_grad_(True)
    module.model.lm = lm if lora is None else apply_lora(lm, lora, token_ids)
    module.base_changed()
