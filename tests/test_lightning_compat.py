"""The Lightning internals this project relies on are all named in one place and checked."""

from __future__ import annotations

import subprocess
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.lightning_compat import (
    INTERNALS,
    MODULE_INTERNALS,
    LightningInternalsChanged,
    check_lightning_internals,
    check_loop_state,
)

ROOT = Path(__file__).resolve().parents[1]


def test_installed_lightning_has_every_internal_we_rely_on():
    check_lightning_internals()


def test_a_changed_signature_fails_loudly_naming_the_internal(monkeypatch):
    monkeypatch.setattr(ModelCheckpoint, "_save_last_checkpoint", lambda self, trainer: None)
    with pytest.raises(LightningInternalsChanged, match=r"ModelCheckpoint\._save_last_checkpoint"):
        check_lightning_internals()


def test_a_removed_internal_fails_loudly_naming_it(monkeypatch):
    monkeypatch.delattr(ModelCheckpoint, "_should_skip_saving_checkpoint")
    with pytest.raises(LightningInternalsChanged, match="_should_skip_saving_checkpoint"):
        check_lightning_internals()


def test_no_other_module_touches_a_listed_internal():
    names = sorted({name for _, name, _ in INTERNALS} | {name for _, name in MODULE_INTERNALS})
    found = subprocess.run(
        [
            "git",
            "grep",
            "-n",
            "-E",
            "|".join(names),
            "--",
            "*.py",
            ":!tests",
            ":!callbacks/lightning_compat.py",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout
    assert found == "", f"Lightning internals used outside callbacks/lightning_compat.py:\n{found}"


def test_a_removed_module_internal_fails_loudly(monkeypatch):
    from lightning.fabric.utilities import load

    monkeypatch.delattr(load, "_load_distributed_checkpoint")
    with pytest.raises(LightningInternalsChanged, match="_load_distributed_checkpoint"):
        check_lightning_internals()


def test_the_fit_loop_counters_rewritten_at_an_epochs_end_are_checked():
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    check_loop_state(trainer)  # the installed Lightning's
    state = trainer.fit_loop.state_dict()
    del state["epoch_loop.state_dict"]["_batches_that_stepped"]
    trainer.fit_loop.state_dict = lambda: state
    with pytest.raises(
        LightningInternalsChanged, match=r"has no epoch_loop\.state_dict/_batches_that_stepped"
    ):
        check_loop_state(trainer)
