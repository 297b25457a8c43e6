"""What a trained run is: the config keys its weights and the meaning of its answers depend on.

Evaluating a run with another value of one of them would score another model than the one trained
(another K, answer spelling, LM shape, prompt, frame count), read its answers' frame indices on
another timeline, or feed it feature vectors that mean something else (:func:`feature_keys`):
evaluate.py refuses such overrides. Under ``model`` only ``model.inference.*`` (how the final answer is
chosen, how many tokens are generated) is an evaluation choice.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedTokenizerBase

from datamodules.annotation_source import STORED_FEATURES
from lightning_modules.tokenizer import TokenizerError, same_tokenizer
from timerefine.pipeline.config import ConfigError, with_schema_defaults
from timerefine.pipeline.config_diff import changes

IDENTITY = (
    "model",
    "data.timeline",
    "data.prompt_template",
    "data.chat_template",
    "data.source.num_frames",
    "data.source.feature_dim",
)
EVALUATION = ("model.inference",)
FEATURES, SEED = "data.source.features", "data.source.seed"
# Features made here from data.source.seed (the built-in data's, with no data.source.features key, too).
GENERATED_FEATURES = ("synthetic", "action_trace")
# What an evaluation reads nothing of: the fit's length, validation, checkpointing, GRPO, the run's
# own place and start (``init_from_run`` is the run's: rebuilt from another, it would be another model).
TRAINING_ONLY = (
    "output_dir",
    "resume",
    "test",
    "init_from_run",
    "grpo",
    "callbacks.checkpoint",
    "callbacks.early_stopping",
    "trainer.max_steps",
    "trainer.max_epochs",
    "trainer.val_check_interval",
    "trainer.check_val_every_n_epoch",
    "trainer.limit_val_batches",
    "trainer.num_sanity_val_steps",
    "trainer.gradient_clip_val",
)


def under(key: str, prefixes: tuple[str, ...]) -> bool:
    """Whether ``key`` is one of ``prefixes`` or a key below one."""
    return any(key == prefix or key.startswith(f"{prefix}.") for prefix in prefixes)


def feature_keys(run: DictConfig) -> tuple[str, ...]:
    """The data keys that say what a feature vector of ``run`` means, besides its size: which store or
    generator made them (``data.source.features``; ``folder`` and ``packed`` hold the same files'
    vectors and count as one), and ``data.source.seed`` where the vectors are drawn from it: the
    built-in data's verb and object vectors (which, with that seed, also draw its videos and queries:
    another test set is ``data.source.num_test``), the synthetic word vectors, the action traces'
    class embeddings. The generators' other knobs (noise, signal, the detector's degradations
    ``action_trace.*``) degrade or scale the same vectors, so an evaluation may change them."""
    features = OmegaConf.select(run, FEATURES, default=None)
    if features is None:  # the built-in data: generated from the seed
        return (SEED,)
    return (FEATURES, SEED) if features in GENERATED_FEATURES else (FEATURES,)


def is_identity(key: str, run: DictConfig) -> bool:
    """Whether ``key`` says what ``run`` was trained as: :data:`IDENTITY` or :func:`feature_keys`."""
    return under(key, (*IDENTITY, *feature_keys(run))) and not under(key, EVALUATION)


def _one_store(key: str, values: tuple[Any, Any]) -> bool:
    """Features read from one store of another kind (a folder of files and their packed store)."""
    return key == FEATURES and all(value in STORED_FEATURES for value in values)


def inherited_identity(run: DictConfig, cfg: DictConfig) -> dict[str, Any]:
    """Dotted key -> ``run``'s value of each identity key (:data:`IDENTITY`, :func:`feature_keys`) a
    run started from it (``init_from_run``) takes: those ``run`` sets and ``cfg``'s data has (the
    built-in data has no ``data.source.features``), but not a stored-features kind over ``cfg``'s own
    (a folder and its packed store hold the same vectors)."""
    absent, taken = object(), {}
    for key in (*IDENTITY, *feature_keys(run)):
        value, own = OmegaConf.select(run, key, default=None), OmegaConf.select(cfg, key, default=absent)
        if value is not None and own is not absent and not _one_store(key, (value, own)):
            taken[key] = value
    return taken


def _changes(trained: DictConfig, evaluated: DictConfig) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (trained, evaluated) of every resolved value that differs."""
    return changes(
        OmegaConf.to_container(trained, resolve=True), OmegaConf.to_container(evaluated, resolve=True)
    )


def identity_error(trained: DictConfig, evaluated: DictConfig) -> str | None:
    """One line naming the identity keys whose value differs between the run's config and the one to
    evaluate it with, and the run's values; None when there are none."""
    differing = _changes(trained, evaluated)
    changed = [key for key in differing if is_identity(key, trained) and not _one_store(key, differing[key])]
    if not changed:
        return None
    was = ", ".join(f"{key}={differing[key][0]}" for key in changed)
    return f"{', '.join(changed)}: what the run was trained as cannot change (trained with {was})"


def training_only_error(trained: DictConfig, evaluated: DictConfig) -> str | None:
    """One line naming the :data:`TRAINING_ONLY` keys whose value differs between the run's config and
    the one to evaluate it with; None when there are none."""
    if changed := [key for key in _changes(trained, evaluated) if under(key, TRAINING_ONLY)]:
        return f"{', '.join(changed)}: training settings, which an evaluation cannot change"
    return None


def recorded_identity_error(
    recorded: Mapping[str, Any], config: Mapping[str, Any] | DictConfig
) -> str | None:
    """:func:`identity_error` between the config that weights were recorded with and ``config``, or why
    the recorded one cannot be read; None when they agree."""
    try:
        trained = with_schema_defaults(OmegaConf.create(recorded))
    except ConfigError as error:  # keys today's schema lacks, a value of the wrong type
        return f"its recorded config cannot be read ({error})"
    return identity_error(trained, OmegaConf.create(config))


def checkpoint_identity_error(
    path: Path, checkpoint: Mapping[str, Any], config: Mapping[str, Any]
) -> str | None:
    """One line naming ``path`` when the config its ``checkpoint`` was trained with and ``config``, the
    one it is about to be used as, differ in :func:`identity_error`'s keys (a run's config.yaml edited
    by hand, or another run's checkpoint passed by path, would decode it as another model); None when
    they agree or the checkpoint records no config."""
    recorded = checkpoint.get("hyper_parameters", {}).get("config")
    reason = None if recorded is None else recorded_identity_error(recorded, config)
    return reason and f"{path} was trained otherwise than the run's config.yaml says: {reason}"


def checkpoint_tokenizer_error(
    path: Path, checkpoint: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, own: Path | str
) -> str | None:
    """One line naming ``path`` when the tokenizer its ``checkpoint`` carries is not ``tokenizer`` (named
    ``own``), which it is about to be used with (another run's checkpoint; a run whose tokenizer was
    trained on other annotations): its token ids, the embedding rows, would mean other tokens; None
    when they agree or the checkpoint carries no tokenizer."""
    carried = checkpoint.get("tokenizer_files")
    try:
        if carried is None or same_tokenizer(carried, tokenizer):
            return None
    except TokenizerError as error:
        return f"{path}: {error}"
    return f"{path} was trained with another tokenizer than {own}: its token ids would mean other tokens"
