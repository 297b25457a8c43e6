"""Command-line overrides that Hydra and OmegaConf would take in silence: a required group removed,
a boolean set to 1 inside a mapping."""

from __future__ import annotations

import re

import pytest

from timerefine.pipeline.config import ConfigError, load_config


@pytest.mark.parametrize("given", [["model=null"], ["~model"], ["model=direct", "~model"]])
def test_a_required_group_set_to_null_or_removed_is_a_config_error(given):
    """Before: ~model was accepted, and model=direct ~model ran TimeRefine."""
    with pytest.raises(ConfigError, match=f"^{given[-1]}: model needs a choice: direct, timerefine"):
        load_config(given)


@pytest.mark.parametrize(
    ("given", "key"),
    [
        ("model.lora={enabled: 1}", "model.lora.enabled=1"),  # before: LoRA on
        ("logger={csv: 0, tensorboard: true}", "logger.csv=0"),  # before: the CSV log off
        ("callbacks={lr_monitor: 0}", "callbacks.lr_monitor=0"),
        ("logger.csv=0", "logger.csv=0"),
    ],
)
def test_a_boolean_set_within_a_mapping_must_be_true_or_false(given, key):
    with pytest.raises(ConfigError, match=f"^{re.escape(key)}: must be true or false$"):
        load_config([given])
    assert load_config(["logger={csv: false, tensorboard: true}"]).logger.csv is False
