"""Runs saved before a key whose default changes what a run does (``UNTIL_ADDED``): read with the value
they ran with where their settings read the key, and a continuation told which value to give."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import train
from timerefine.pipeline.config import load_run_config

RUN = [
    "experiment=tiny",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "model.saliency.projector_steps=0",
    "test=false",
    "logger.tensorboard=false",
    "callbacks.refinement_trace=0",
]
KEY = "video_whitespace"  # of model.lm


def saved_before_the_key(run: Path) -> None:
    """``run`` as written before ``model.lm.video_whitespace``: no such key in its ``config.yaml``, nor
    in the config its checkpoints record."""
    config = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"))
    del config["model"]["lm"][KEY]
    (run / "config.yaml").write_text(OmegaConf.to_yaml(config))
    for checkpoint in (run / "checkpoints").glob("*.ckpt"):
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        del state["hyper_parameters"]["config"]["model"]["lm"][KEY]
        torch.save(state, checkpoint)


@pytest.fixture(scope="module")
def old_runs(tmp_path_factory) -> dict[str, Path]:
    runs = {}
    for style in ("project", "reference"):
        runs[style] = tmp_path_factory.mktemp(style) / "run"
        assert train.main([*RUN, f"model.lm.grounding_tokens={style}", f"output_dir={runs[style]}"]) == 0
        saved_before_the_key(runs[style])
    return runs


def test_a_continuation_names_the_value_the_run_ran_with(old_runs, capsys):
    """Before: '... use another output_dir for the new settings', for a command that changed nothing."""
    run = old_runs["project"]
    assert load_run_config(run, []).model.lm[KEY] == "folded"
    more = [*RUN, "trainer.max_steps=4", f"output_dir={run}"]
    assert train.main(more) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert f"(model.lm.{KEY}: folded -> kept)" in err[0]
    assert err[0].endswith(
        f"give model.lm.{KEY}=folded to continue it (what a run saved before the key "
        "ran with; today's default differs)"
    )
    assert train.main([*more, f"model.lm.{KEY}=folded"]) == 0


def test_a_reference_style_run_reads_no_video_whitespace_and_continues(old_runs):
    """Before: refused (folded -> kept) over a key that a reference-style run does not read, and giving
    folded warned that it is not read."""
    run = old_runs["reference"]
    assert load_run_config(run, []).model.lm[KEY] == "kept"
    more = [*RUN, "model.lm.grounding_tokens=reference", "trainer.max_steps=4", f"output_dir={run}"]
    assert train.main(more) == 0
