"""Settings that nothing reads, the others being as they are (LoRA keys with LoRA off, the aux weight
of a direct answer, GRPO keys with GRPO off): warned of when a run starts, not refused."""

from __future__ import annotations

import logging

import pytest

from timerefine import train
from timerefine.pipeline.config import idle_settings, load_config

DIRECT = "a direct answer (model.refine.steps=0) has no <OFFSET>"


@pytest.mark.parametrize(
    ("overrides", "warnings"),
    [
        (["model.lora.r=8"], ["model.lora.r=8 is not read: LoRA is off (model.lora.enabled=false)"]),
        (["model.lora.enabled=true", "model.lora.r=8"], []),
        (["model.lora.inherited=merge"], ["model.lora.inherited=merge is not read: no init_from_run"]),
        (["model.refine.steps=0", "model.aux.weight=2"], [f"model.aux.weight=2.0 is not read: {DIRECT}"]),
        (["model=direct", "model.aux.weight=1"], [f"model.aux.weight=1.0 is not read: {DIRECT}"]),
        (
            ["experiment=timerefine_onpolicy", "model=direct", "model.refine.on_policy.fraction=0.25"],
            [f"model.refine.on_policy.fraction=0.25 is not read: {DIRECT}"],
        ),
        (
            ["grpo.G=4", "grpo.beta=0.1"],
            [f"grpo.{k} is not read: GRPO is off (grpo.enabled=false)" for k in ("G=4", "beta=0.1")],
        ),
        (
            ["experiment=reference_recipe", "model.lm.video_whitespace=folded"],
            [
                "model.lm.video_whitespace=folded is not read: model.lm.grounding_tokens=reference has "
                "no <video> token"
            ],
        ),
        (["model.lm.video_whitespace=folded"], []),
        (  # before (review): ignored without a word
            ["experiment=smollm2", "model.lm.tiny.hidden_size=256", "model.lm.tokenizer_vocab_size=500"],
            [
                "model.lm.tiny.hidden_size=256 is not read: a pretrained LM (model.lm.name_or_path) has "
                "its own size",
                "model.lm.tokenizer_vocab_size=500 is not read: it sizes the BPE trained on the data, made "
                "only without model.lm.name_or_path and model.lm.tokenizer",
            ],
        ),
        (["model.lm.tiny.hidden_size=64", "model.lm.tokenizer_vocab_size=500"], []),
        # what the user did not set is not theirs to fix (review: the schema's aux weight at K=0, an
        # experiment's LoRA keys with the LoRA that model.lm.weights=random must turn off)
        (["model.refine.steps=0"], []),
        (["experiment=smollm2", "model.lm.weights=random", "model.lora.enabled=false"], []),
        (["experiment=reference_recipe", "model=direct"], []),
        ([], []),
    ],
)
def test_settings_given_that_nothing_reads_are_named(overrides, warnings):
    assert list(idle_settings(load_config(overrides), overrides)) == warnings


@pytest.mark.parametrize(
    ("overrides", "warnings"),
    [
        (  # before (review): accepted without a word
            ["grpo.refine_bonus=0.5", "grpo.epsilon=0.3", "model.refine.on_policy.fraction=0.5"],
            [
                "model.refine.on_policy.fraction=0.5 is not read: GRPO trains on its own samples, not on "
                "on-policy targets",
                "grpo.refine_bonus=0.5 is not read: only the refine_gain reward (grpo.reward) reads it",
                "grpo.epsilon=0.3 is not read: the ratio of a rollout's one step (grpo.num_iterations=1) is "
                "1, never clipped",
            ],
        ),
        (["grpo.reward=[refine_gain]", "grpo.refine_bonus=0.5"], []),
        (["grpo.num_iterations=2", "grpo.epsilon=0.3"], []),
    ],
)
def test_grpo_settings_that_nothing_reads_are_named(tmp_path, overrides, warnings):
    (tmp_path / "checkpoints").mkdir()  # a run folder to start from, as the schema checks one
    (tmp_path / "config.yaml").touch()
    grpo = ["experiment=grpo", f"init_from_run={tmp_path}", *overrides]
    assert list(idle_settings(load_config(grpo), grpo)) == warnings


def test_a_run_warns_of_them(tmp_path, caplog):
    """Before: model.lora.r=8 (README's own example) trained with LoRA off, and said nothing."""
    run = ["experiment=tiny", "trainer.max_steps=1", "test=false", f"output_dir={tmp_path / 'run'}"]
    with caplog.at_level(logging.WARNING, logger="train"):
        assert train.main([*run, "model.lora.r=8"]) == 0
    assert "model.lora.r=8 is not read: LoRA is off (model.lora.enabled=false)" in caplog.messages
