"""A Hugging Face Hub name (lightning_modules/pretrained.py): one line where it is neither in the local
cache nor reachable, found with one request instead of from_pretrained's retries; loaded as before
where it is cached or the Hub answers."""

from __future__ import annotations

import logging

import pytest
from huggingface_hub import constants

import train
from lightning_modules import pretrained
from lightning_modules.pretrained import MissingModelError, hub_unreachable, resolve_pretrained

ABSENT = "timerefine-tests/no-such-model"
CLOSED_PORT = "http://127.0.0.1:9"  # refuses at once, as an unreachable Hub does without retries


@pytest.fixture
def hub_down(monkeypatch):
    """The Hub at a port that refuses connections, probed anew."""
    monkeypatch.setattr(constants, "ENDPOINT", CLOSED_PORT)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub_unreachable.cache_clear()
    yield
    hub_unreachable.cache_clear()


def test_the_probe_names_why_the_hub_cannot_be_reached(hub_down):
    assert "refused" in hub_unreachable().lower()


def test_offline_mode_requests_nothing(hub_down, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub_unreachable() is None


def test_an_uncached_name_the_hub_cannot_give_is_refused(hub_down):
    with pytest.raises(MissingModelError) as error:
        resolve_pretrained(ABSENT)
    message = str(error.value)
    assert message.startswith(f"{ABSENT}: not a local folder, not in the Hugging Face cache")
    assert "the Hub cannot be reached" in message and f"hf download {ABSENT}" in message


@pytest.mark.parametrize("cached", ["config.json", "tokenizer_config.json"])
def test_a_cached_name_loads_and_the_log_says_how_to_skip_the_retries(hub_down, monkeypatch, caplog, cached):
    """A model's repo, or a tokenizer's (model.lm.tokenizer), which has no config.json (review)."""
    monkeypatch.setattr(
        pretrained, "try_to_load_from_cache", lambda repo, file: f"/cache/{file}" if file == cached else None
    )
    with caplog.at_level(logging.WARNING, logger=pretrained.__name__):
        assert resolve_pretrained(ABSENT) == ABSENT
    assert "HF_HUB_OFFLINE=1" in caplog.text


def test_a_name_that_is_no_folder_and_no_hub_name_is_refused(monkeypatch):
    """Before (review): HFValidationError from the cache lookup, a traceback."""
    monkeypatch.setattr(pretrained, "hub_unreachable", lambda: pytest.fail("no Hub name: nothing to probe"))
    with pytest.raises(
        MissingModelError, match=r"^models/sub/folder: not a local folder, and not a Hugging Face name"
    ):
        resolve_pretrained("models/sub/folder")


def test_a_reachable_hub_and_a_local_folder_pass_through(monkeypatch, tmp_path):
    monkeypatch.setattr(pretrained, "hub_unreachable", lambda: None)
    assert resolve_pretrained(ABSENT) == ABSENT
    monkeypatch.setattr(pretrained, "hub_unreachable", lambda: pytest.fail("a folder needs no probe"))
    assert resolve_pretrained(str(tmp_path)) == str(tmp_path)


def test_a_run_on_an_unreachable_name_stops_in_one_line(hub_down, tmp_path, capsys):
    """Before: about 50 s of retries (two loads, five each), then 'no usable tokenizer loads from it'."""
    output_dir = tmp_path / "run"
    overrides = ["experiment=tiny", f"model.lm.name_or_path={ABSENT}", f"output_dir={output_dir}"]
    assert train.main(overrides) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    expected = f"error: model.lm.name_or_path={ABSENT}: not a local folder, not in the Hugging Face cache"
    assert len(lines) == 1 and lines[0].startswith(expected), lines
    assert not output_dir.exists()
