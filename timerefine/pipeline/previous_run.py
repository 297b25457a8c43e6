"""What ``output_dir`` and the resume checkpoint hold of an earlier run, checked before a run writes
anything: a run continues (or starts over in the same folder) only with the settings it was started
with, and a finished run is not run again."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from omegaconf import DictConfig, OmegaConf

from callbacks.slurm_requeue import hpc_checkpoints, hpc_version
from lightning_modules.grounding_module import PRECISION
from lightning_modules.tokenizer import TokenizerError, tokenizer_from_files
from timerefine.pipeline.config import UNTIL_ADDED, ConfigError, saved_config, with_schema_defaults
from timerefine.pipeline.config_diff import changes, show
from timerefine.pipeline.conventions import run_precision
from timerefine.pipeline.resume import CheckpointError, checkpoint_file, resume_checkpoint, trainer_state
from timerefine.pipeline.training_rules import training_refusal

log = logging.getLogger(__name__)
NOT_STOPPED = EarlyStoppingReason.NOT_STOPPED.value  # as EarlyStopping's state records it

# How a run is carried out, not what it computes: a finished run re-run with only these changed is done.
INCIDENTAL = (
    "output_dir",
    "resume",
    "data.num_workers",
    "trainer.enable_progress_bar",
    "callbacks.progress_bar",
)
# What a continued run may do differently: train longer, validate, log and test otherwise.
CONTINUABLE = (
    "trainer.max_steps",
    "trainer.max_epochs",
    "trainer.val_check_interval",
    "trainer.check_val_every_n_epoch",
    "trainer.limit_val_batches",
    "trainer.limit_test_batches",
    "trainer.log_every_n_steps",
    "test",
)
MAY_CHANGE = INCIDENTAL + CONTINUABLE


class ChangedSettingsError(Exception):
    """A run started in a folder, or from a checkpoint, of a run with other settings."""


def recorded_configs(output_dir: Path, checkpoint: str | None) -> list[tuple[str, dict[str, Any]]]:
    """(file, resolved config) of what an earlier run left: ``output_dir/config.yaml`` and the config
    that ``checkpoint`` (a ``resume_checkpoint`` result) carries in ``hyper_parameters`` (its tensors
    are mapped, not read); each completed by today's schema defaults."""
    found: list[tuple[str, DictConfig]] = []
    saved = output_dir / "config.yaml"
    if saved.is_file():
        found.append((str(saved), saved_config(saved)))
    if checkpoint is not None:
        file = checkpoint_file(checkpoint, output_dir)
        config = trainer_state(file).get("hyper_parameters", {}).get("config")
        if config is not None:
            found.append((str(file), OmegaConf.create(config)))
    completed = []
    for where, cfg in found:
        try:
            completed.append((where, OmegaConf.to_container(with_schema_defaults(cfg), resolve=True)))
        except ConfigError as error:  # a saved key nothing reads, a value of the wrong type
            raise error.of_file(where) from error
    return completed


def continue_advice(refused: Mapping[str, tuple[Any, Any]]) -> str:
    """What to do about the ``refused`` changes (key -> (old, new)): give the old values where each is
    what a run saved before its key ran with (``UNTIL_ADDED``: the command did not change it, today's
    default did), else take another folder."""
    if not all(key in UNTIL_ADDED and UNTIL_ADDED[key] == old for key, (old, _) in refused.items()):
        return "use another output_dir for the new settings"
    given = " ".join(f"{key}={show(old)}" for key, (old, _) in refused.items())
    return f"give {given} to continue it (what a run saved before the key ran with; today's default differs)"


def check_same_settings(cfg: DictConfig, output_dir: Path, checkpoint: str | None) -> None:
    """Raise :class:`ChangedSettingsError` when ``cfg`` differs from the earlier run's config in a key
    not in :data:`MAY_CHANGE`, naming each such key (old -> new) and the keys that may change, or
    when its ``trainer.max_steps`` or ``trainer.max_epochs`` stops short of where ``checkpoint`` is.
    ``trainer.precision`` may change where ``checkpoint`` records the precision it was trained in:
    :func:`check_same_precision` compares what it gives."""
    new = OmegaConf.to_container(cfg, resolve=True)
    file = None if checkpoint is None else checkpoint_file(checkpoint, output_dir)
    state = {} if file is None else trainer_state(file)
    trained_in = state.get(PRECISION)  # None: no checkpoint, or one saved before it was recorded
    for where, old in recorded_configs(output_dir, checkpoint):
        refused = {
            key: pair
            for key, pair in changes(old, new).items()
            if key not in MAY_CHANGE and not (key == "trainer.precision" and trained_in is not None)
        }
        if refused:
            listed = ", ".join(f"{k}: {show(a)} -> {show(b)}" for k, (a, b) in refused.items())
            raise ChangedSettingsError(
                f"{where} was written by a run with other settings ({listed}); a run continues with "
                f"the settings it started with, only {', '.join(MAY_CHANGE)} may change: "
                f"{continue_advice(refused)}"
            )
    if file is not None:
        given = not own_resume_point(checkpoint, output_dir)
        check_reaches(cfg.trainer.max_steps, file, state, given)
        if cfg.trainer.max_epochs is not None:
            check_reaches_epochs(cfg.trainer.max_epochs, file, state, given)
        if stop := early_stop(state):
            check_stopped_length(cfg, file, state, stop)
        elif change := length_change(state, cfg):
            log.warning(change)
        if change := validation_change(state, cfg):
            log.warning(change)


def may_train(cfg: DictConfig) -> str | None:
    """ConfigError for what :func:`training_refusal` refuses, unless ``output_dir`` holds a run begun so
    (:func:`begun_so`): then the warning that it continues as it began; None when nothing is refused."""
    if not (refused := training_refusal(cfg)):
        return None
    if not begun_so(cfg, refused):
        raise ConfigError(refused)
    return f"{refused} ({cfg.output_dir} was begun so, and continues as it began)"


def begun_so(cfg: DictConfig, refused: str) -> bool:
    """Whether ``output_dir`` holds a run begun with the settings ``training_refusal`` now ``refused``
    (its ``config.yaml`` refused alike): begun before the rule, it continues as it began, which
    :func:`check_same_settings` holds it to, warned of, not refused."""
    saved = Path(cfg.output_dir) / "config.yaml"
    try:
        return saved.is_file() and training_refusal(with_schema_defaults(saved_config(saved))) == refused
    except ConfigError:  # not a config this code reads: the settings check names it
        return False


def check_same_precision(cfg: DictConfig, file: Path, state: Mapping[str, Any]) -> None:
    """Raise :class:`ChangedSettingsError` when ``trainer.precision`` gives another precision here than
    the one the steps of ``file`` (its ``state``) were trained in (``auto`` chooses by machine; a value
    that gives the same one may replace it); a checkpoint saved before it was recorded passes."""
    here, trained_in = run_precision(cfg), state.get(PRECISION)
    if trained_in is not None and here.precision != trained_in:
        raise ChangedSettingsError(
            f"{file} was trained in {trained_in} precision, and trainer.precision={cfg.trainer.precision} "
            f"gives {here.precision} here ({here.reason}); a run continues in the precision it trained in: "
            f"give trainer.precision={trained_in} to continue it, or use another output_dir"
        )


def early_stop(state: Mapping[str, Any]) -> str | None:
    """Why the run of a checkpoint's ``state`` stopped early (its EarlyStopping's record); None if it
    did not."""
    saved = next((s for k, s in state.get("callbacks", {}).items() if k.startswith("EarlyStopping{")), {})
    if saved.get("stopping_reason", NOT_STOPPED) == NOT_STOPPED:
        return None
    return saved.get("stopping_reason_message") or "its early stopping stopped it"


def check_stopped_length(cfg: DictConfig, checkpoint: Path, state: Mapping[str, Any], stop: str) -> None:
    """A run whose checkpoint records an early stop trains no further: another length would only be
    written into its config.yaml."""
    trained = state.get("hyper_parameters", {}).get("config", {}).get("trainer", {})
    if trained.get("max_steps", cfg.trainer.max_steps) != cfg.trainer.max_steps:
        raise ChangedSettingsError(
            f"trainer.max_steps={cfg.trainer.max_steps}: {checkpoint} stopped early at step "
            f"{state.get('global_step', 0)} ({stop}) and trains no further; init_from_run=<its run> "
            "in another output_dir trains on from its weights"
        )


def length_change(state: Mapping[str, Any], cfg: DictConfig) -> str | None:
    """What a continued run's learning rate does when its length (``trainer.max_steps``, or
    ``max_epochs``) is not the one the checkpoint ``state`` was trained for; None when it is."""
    trained = state.get("hyper_parameters", {}).get("config", {}).get("trainer", {})
    length = ("max_steps", "max_epochs")
    before, now = [trained.get(key) for key in length], [cfg.trainer[key] for key in length]
    if before == now or None in before[:1]:
        return None
    changed = ", ".join(
        f"trainer.{k} {a} -> {b}" for k, a, b in zip(length, before, now, strict=True) if a != b
    )
    return (
        f"{changed}: from step {state.get('global_step', 0)} on, the learning rate follows the new "
        "length's curve (warmup and cosine decay span the whole run), so this run differs from one "
        "trained that long from the start"
    )


def validation_change(state: Mapping[str, Any], cfg: DictConfig) -> str | None:
    """What a continued run compares when its validation subset (``trainer.limit_val_batches``) is not
    the one the best scores recorded in the checkpoint ``state`` were taken on; None when it is, when
    no score is recorded, or when the run trains no further."""
    trained = state.get("hyper_parameters", {}).get("config", {}).get("trainer", {})
    before, now = trained.get("limit_val_batches"), cfg.trainer.limit_val_batches
    step, saved = state.get("global_step", 0), state.get("callbacks", {})
    keepers = {"ModelCheckpoint{": "the best checkpoint", "EarlyStopping{": "early stopping"}
    scored = [
        who
        for key, record in saved.items()
        for prefix, who in keepers.items()
        if key.startswith(prefix) and recorded_score(record) is not None
    ]
    if (
        validation_subset(before) == validation_subset(now)
        or not scored
        or 0 <= cfg.trainer.max_steps <= step
    ):
        return None
    return (
        f"trainer.limit_val_batches {show(before)} -> {show(now)}: this run's validation scores are "
        f"compared, by {' and '.join(scored)}, with the best score taken by step {step} on the other "
        "validation subset"
    )


def validation_subset(limit: int | float | None) -> tuple[bool, float]:
    """What Lightning validates on for a ``limit_val_batches``: (counted in batches, how many or what
    share); an int counts batches, a float is a share (1 and 1.0 differ), null is all of them."""
    return (False, 1.0) if limit is None else (isinstance(limit, int), float(limit))


def recorded_score(record: Mapping[str, Any]) -> float | None:
    """The best score a ModelCheckpoint's or EarlyStopping's saved state records; None before any."""
    score = record.get("best_model_score", record.get("best_score"))
    return None if score is None or not math.isfinite(float(score)) else float(score)


def shorter_run(given: bool) -> str:
    """How to train fewer steps than a checkpoint (``given`` as ``resume=``, or the folder's own) holds."""
    return "init_from_run=<its run> to start from its weights" if given else "another output_dir"


def check_reaches(max_steps: int, checkpoint: Path, state: Mapping[str, Any], given: bool) -> None:
    """A continued run trains to at least the step its checkpoint (``state``; ``given`` as ``resume=``,
    or found in ``output_dir``) reached: with fewer ``max_steps`` Lightning would stop at once and test
    the checkpoint's model under a config.yaml saying fewer."""
    reached = state.get("global_step", 0)
    if 0 <= max_steps < reached:
        raise ChangedSettingsError(
            f"trainer.max_steps={max_steps}: {checkpoint} is at step {reached} already, and a run "
            f"continues to at least that step; give trainer.max_steps >= {reached}, or "
            f"{shorter_run(given)} for a shorter run"
        )


def epochs_reached(state: Mapping[str, Any]) -> tuple[int, bool]:
    """(epochs a checkpoint's ``state`` finished, whether it is part-way through the next one), from
    the fit loop's progress as Lightning restores it (an epoch whose last batch is trained counts)."""
    loop = state["loops"]["fit_loop"]
    epochs, batches = loop["epoch_progress"]["current"], loop["epoch_loop.batch_progress"]
    in_next = epochs["started"] > epochs["processed"] and batches["current"]["completed"] > 0
    if in_next and batches["is_last_batch"]:
        return epochs["processed"] + 1, False
    return epochs["processed"], in_next


def check_reaches_epochs(max_epochs: int, checkpoint: Path, state: Mapping[str, Any], given: bool) -> None:
    """As :func:`check_reaches` for ``trainer.max_epochs`` (-1: no limit): Lightning stops a continued
    run at once when the checkpoint has trained that many epochs, or part of one more."""
    epochs, part_way = epochs_reached(state)
    if 0 <= max_epochs < epochs + part_way:
        where = f"in epoch {epochs + 1}" if part_way else f"at the end of epoch {epochs}"
        raise ChangedSettingsError(
            f"trainer.max_epochs={max_epochs}: {checkpoint} is at step {state.get('global_step', 0)} "
            f"already ({where}), and a run continues to at least that step; give trainer.max_epochs >= "
            f"{epochs + part_way}, or {shorter_run(given)} for a shorter run"
        )


def own_resume_point(checkpoint: str, output_dir: Path) -> bool:
    """Whether ``checkpoint`` (a :func:`resume_checkpoint` result) is ``output_dir``'s own resume point:
    its ``last.ckpt`` or a SLURM HPC checkpoint."""
    last = output_dir / "checkpoints" / "last.ckpt"
    return checkpoint == "hpc" or Path(checkpoint).resolve() == last.resolve()


def continued_checkpoint(resume: str | None, output_dir: Path) -> str | None:
    """The checkpoint a run continues from: :func:`resume_checkpoint`'s, but ``output_dir``'s own resume
    point (``resume=auto``'s) where ``resume`` names another checkpoint and that point is at a later
    step: a run started there from ``resume`` and was stopped since, and the same command continues it
    instead of training the steps since again; another ``output_dir`` starts from ``resume`` anew. An
    own resume point that cannot be read is passed over with a warning: ``resume`` is the way past it.
    An HPC checkpoint of ``output_dir`` that a later requeue removed is read as ``resume=auto``."""
    if resume not in (None, "auto") and removed_by_requeue(Path(resume), output_dir):
        log.info("resume=%s: a later requeue of this run replaced it: continuing from the newest", resume)
        resume = "auto"
    checkpoint = resume_checkpoint(resume, output_dir)
    if checkpoint is None or resume == "auto" or own_resume_point(checkpoint, output_dir):
        return checkpoint
    try:
        own = resume_checkpoint("auto", output_dir)
        step = -1 if own is None else step_of(own, output_dir)
    except CheckpointError as error:
        log.warning("resume=%s: passing over this run's own resume point: %s", resume, error)
        return checkpoint
    if own is None or step <= step_of(checkpoint, output_dir):
        return checkpoint
    log.info(
        "resume=%s: this run's own resume point %s is further along (step %d): continuing from it "
        "(another output_dir starts from %s anew)",
        resume,
        checkpoint_file(own, output_dir),
        step,
        resume,
    )
    return own


def removed_by_requeue(checkpoint: Path, output_dir: Path) -> bool:
    """Whether ``checkpoint`` is a missing HPC checkpoint of ``output_dir``, which holds a newer one: a
    requeue removes the earlier ones once it has saved its own (callbacks/slurm_requeue.py)."""
    version = hpc_version(checkpoint)
    if version is None or checkpoint.exists() or checkpoint.parent.resolve() != output_dir.resolve():
        return False
    return max(hpc_checkpoints(output_dir), default=0) > version


def step_of(checkpoint: str, output_dir: Path) -> int:
    """The step a :func:`resume_checkpoint` result is at."""
    return trainer_state(checkpoint_file(checkpoint, output_dir)).get("global_step", 0)


def finished(cfg: DictConfig, output_dir: Path, checkpoint: str | None) -> bool:
    """Whether ``output_dir`` holds this run finished: ``metrics.json`` (which a run removes when it
    starts and writes when it ends) and the same settings but :data:`INCIDENTAL` ones, or ``test``
    turned off (its test is done and stays). Only when it would continue from its own resume point
    (``checkpoint``, :func:`continued_checkpoint`'s; none with ``resume=auto``): ``resume=null`` would
    start the run over, which resume.py refuses beside its checkpoints, and another checkpoint trains
    from there."""
    saved = output_dir / "config.yaml"
    own = own_resume_point(checkpoint, output_dir) if checkpoint else cfg.resume == "auto"
    if not own or not (output_dir / "metrics.json").is_file() or not saved.is_file():
        return False
    old = OmegaConf.to_container(with_schema_defaults(saved_config(saved)), resolve=True)
    changed = changes(old, OmegaConf.to_container(cfg, resolve=True))
    return all(key in INCIDENTAL or (key == "test" and now is False) for key, (_, now) in changed.items())


def carried_tokenizer(
    checkpoint: Path, state: Mapping[str, Any], tokenizer_dir: Path
) -> dict[str, bytes] | None:
    """The tokenizer files the resume ``checkpoint`` (its ``state``) carries when the run's
    ``tokenizer_dir`` is missing (deleted, a run copied without it, another run's checkpoint resumed in
    a new folder): the run continues with the tokenizer its weights were trained with, never one
    trained anew from today's annotations; None when the folder is there. CheckpointError when the
    checkpoint carries none, or one that cannot be read."""
    if tokenizer_dir.is_dir():
        return None
    files = state.get("tokenizer_files")
    if files is None:
        raise CheckpointError(
            f"{tokenizer_dir}: missing, and {checkpoint} carries no tokenizer: its token ids mean nothing "
            "known; put the run's tokenizer back"
        )
    try:
        tokenizer_from_files(files, "kept")
    except TokenizerError as error:
        raise CheckpointError(f"{checkpoint}: {error}") from error
    log.info("%s: missing; restored from the tokenizer %s carries", tokenizer_dir, checkpoint)
    return files
