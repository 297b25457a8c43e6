"""The errors that mean a user mistake (bad data, config, checkpoint): the entry points print their
one-line message and exit 2, without a traceback."""

from __future__ import annotations

from datamodules.feature_stores import StoreIndexError, StoreMismatchError
from datamodules.query_control import QueryControlError
from datamodules.quirks import QuirkError
from grounding.records import EmptySplitError, FeatureError
from lightning_modules.base_weights import BaseWeightsError
from lightning_modules.grpo_module import ReferenceChangedError
from lightning_modules.language_model import LoraTargetError
from lightning_modules.optimization import NonFiniteLossError
from lightning_modules.pretrained import GgufError, MissingModelError, UnusableModelError
from lightning_modules.released_weights import ReleasedWeightsError
from lightning_modules.tokenizer import TokenizerError
from timerefine.pipeline.config import ConfigError
from timerefine.pipeline.init_from_run import RunStartError
from timerefine.pipeline.precision import PrecisionError
from timerefine.pipeline.previous_run import ChangedSettingsError
from timerefine.pipeline.resume import CheckpointError

STOPPED_BY_SIGTERM = 128 + 15  # the exit code, as a shell reports a process ended by SIGTERM
INTERRUPTED = 128 + 2  # ... and by Ctrl-C (SIGINT)

INPUT_ERRORS = (
    ConfigError,
    FeatureError,
    QuirkError,
    EmptySplitError,
    FileNotFoundError,
    PermissionError,  # an output folder the user may not write in; the message names it
    CheckpointError,
    ChangedSettingsError,
    ReleasedWeightsError,
    BaseWeightsError,
    MissingModelError,
    UnusableModelError,
    LoraTargetError,
    GgufError,
    RunStartError,
    StoreMismatchError,
    StoreIndexError,
    NonFiniteLossError,
    TokenizerError,
    ReferenceChangedError,
    QueryControlError,
    PrecisionError,
)
