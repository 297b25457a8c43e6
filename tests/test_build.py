"""What the builder makes of a config (pipeline.build): gradient accumulation from the global batch,
video tokens per frame group, the on-policy guesses' collator, the saliency loss."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from callbacks.global_batch import accumulation
from callbacks.on_policy import OnPolicyCoarse
from grounding.answer_format.tokens import VIDEO
from timerefine.pipeline.build import build_callbacks, build_datamodule, build_module, build_trainer
from timerefine.pipeline.config import ConfigError, load_config
from timerefine.pipeline.training_rules import training_refusal


def test_accumulation():
    assert accumulation(64, 8, 1) == 8
    assert accumulation(64, 8, 2) == 4
    assert accumulation(64, 8, 4) == 2  # e.g. 2 devices x 2 nodes


@pytest.mark.parametrize(("global_batch", "world_size"), [(60, 1), (64, 3), (8, 2)])
def test_accumulation_rejects_indivisible_global_batches(global_batch, world_size):
    with pytest.raises(ValueError, match="global_batch_size"):
        accumulation(global_batch, 8, world_size)


def tiny_build_overrides(tmp_path) -> list[str]:
    return [
        "trainer.accelerator=cpu",
        "data.source.num_train=16",
        "data.source.num_val=4",
        "data.source.num_test=4",
        "model.lm.tiny.hidden_size=32",
        "model.lm.tiny.num_layers=1",
        "model.lm.tiny.num_heads=2",
        "model.lm.tiny.intermediate_size=64",
        "logger.csv=false",
        "logger.tensorboard=false",
        f"output_dir={tmp_path}",
    ]


def test_accumulation_follows_the_trainer_world_size(tmp_path):
    """The trainer resolves devices (-1, "auto", lists); accumulation uses its real process count: one
    optimizer step of a global batch of 32 reads 4 batches of 8, and no global batch size means 1. An
    int val_check_interval counts optimizer steps, as max_steps does (before: batches, so validation
    came 4 times as often on one device as on 4 with the same global batch)."""
    overrides = [*tiny_build_overrides(tmp_path), "trainer.devices=1", "data.batch_size=8"]
    overrides += ["trainer.val_check_interval=7"]
    overrides += ["data.source.num_train=32", "trainer.max_steps=1", "trainer.limit_val_batches=0"]
    overrides += ["model.saliency.projector_steps=0"]
    # +trainer.accumulate_grad_batches: before, its interval counted batches (validations twice as often)
    cases = (("data.global_batch_size=32", 4), ("data.global_batch_size=null", 1))
    for given, batches in (*cases, ("+trainer.accumulate_grad_batches=2", 2)):
        cfg = load_config([*overrides, given])
        datamodule = build_datamodule(cfg)
        module = build_module(cfg, datamodule)
        trainer = build_trainer(cfg, tmp_path / given, module)
        assert trainer.val_check_interval == 7 * batches
        trainer.fit(module, datamodule=datamodule)
        assert trainer.world_size == 1 and trainer.accumulate_grad_batches == batches
        assert (
            trainer.global_step == 1 and trainer.fit_loop.epoch_loop.batch_progress.total.completed == batches
        )


@pytest.mark.parametrize(
    ("given", "message"),
    [  # each was a traceback (TypeError, KeyError)
        ("trainer.limit_val_batches=abc", "trainer (accelerator, devices, strategy, ...): Lightning refuses"),
        ("trainer.devices=abc", "trainer (accelerator, devices, strategy, ...): Lightning refuses"),
        (
            "trainer=fsdp trainer.strategy.sharding_strategy=BOGUS",
            "trainer.strategy.sharding_strategy=BOGUS: ",
        ),
    ],
)
def test_what_lightning_refuses_is_one_config_line(tmp_path, given, message):
    cfg = load_config([*tiny_build_overrides(tmp_path), *given.split()])
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_trainer(cfg, tmp_path, build_module(cfg, build_datamodule(cfg)))


@pytest.mark.parametrize("batches", ["2.0", "0", "abc", "true"])
def test_accumulation_is_a_whole_number_of_batches(tmp_path, batches):
    """Before: 0 and abc were tracebacks, and 2.0 made validation's interval a share of an epoch."""
    cfg = load_config([*tiny_build_overrides(tmp_path), f"+trainer.accumulate_grad_batches={batches}"])
    assert training_refusal(cfg) == (
        f"trainer.accumulate_grad_batches={cfg.trainer.accumulate_grad_batches}: a whole number of batches, "
        "at least 1"
    )
    assert training_refusal(load_config(["+trainer.accumulate_grad_batches=2"])) is None


def test_an_fsdp_option_nothing_takes_is_refused():
    """Before: accepted (FSDPStrategy takes **kwargs), and FullyShardedDataParallel refused it in fit."""
    with pytest.raises(ConfigError, match="neither FSDPStrategy nor FullyShardedDataParallel takes an arg"):
        load_config(["trainer=fsdp", "+trainer.strategy.limit_all_gather=true"])
    assert load_config(["trainer=fsdp", "+trainer.strategy.limit_all_gathers=true"])


def test_accumulation_is_set_once(tmp_path):
    """Before: GlobalBatch silently replaced the accumulation given, which config.yaml kept."""
    both = ["data.batch_size=8", "data.global_batch_size=32", "+trainer.accumulate_grad_batches=4"]
    cfg = load_config([*tiny_build_overrides(tmp_path), *both])
    with pytest.raises(
        ConfigError, match=r"^trainer\.accumulate_grad_batches=4 with data\.global_batch_size=32"
    ):
        build_trainer(cfg, tmp_path, build_module(cfg, build_datamodule(cfg)))


def test_a_global_batch_that_the_processes_cannot_split_is_refused_before_training(tmp_path):
    cfg = load_config([*tiny_build_overrides(tmp_path), "data.batch_size=8", "data.global_batch_size=60"])
    with pytest.raises(ConfigError, match=r"data\.global_batch_size=60 is not a multiple"):
        build_trainer(cfg, tmp_path, build_module(cfg, build_datamodule(cfg)))


@pytest.mark.parametrize("temporal_embedding", ["learned", "digits", "text"])
def test_frames_per_token_sets_the_prompt_placeholders(tmp_path, temporal_embedding):
    """25 video tokens; with ``text`` each follows its index, which the projector's query skips."""
    cfg = load_config(
        [
            *tiny_build_overrides(tmp_path),
            "model.projector.frames_per_token=4",
            f"model.projector.temporal_embedding={temporal_embedding}",
        ]
    )
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    module = build_module(cfg, datamodule)
    batch = datamodule.collator([datamodule.datasets["train"][(0, i)] for i in range(2)])
    video = module.tokenizer.convert_tokens_to_ids(VIDEO)
    assert (batch["input_ids"] == video).sum(1).tolist() == [25, 25]  # 100 frames / 4
    assert module.model.stamp_length == (2 if temporal_embedding == "text" else 0)
    if temporal_embedding == "text":
        first = batch["input_ids"][0].tolist().index(video)
        assert module.tokenizer.decode(batch["input_ids"][0, first - 2 : first]) == "00"
    assert torch.isfinite(
        module.model(batch["input_ids"], batch["attention_mask"], batch["features"], batch["labels"]).loss
    )


def test_on_policy_guesses_reach_the_collator_it_was_built_with(tmp_path):
    """The builder mutates nothing: the collator reads the datamodule's guesses, which the on-policy
    callback fills (refresh) and restores (resume)."""
    cfg = load_config([*tiny_build_overrides(tmp_path), "model.refine.on_policy.fraction=1"])
    datamodule = build_datamodule(cfg)
    (callback,) = [
        c
        for c in build_callbacks(cfg, tmp_path, OmegaConf.to_object(cfg.model.refine))
        if isinstance(c, OnPolicyCoarse)
    ]
    callback.setup(SimpleNamespace(datamodule=datamodule), None, "fit")
    first, second = datamodule.records("train")[:2]
    callback.coarse[first.qid] = (70, 90)  # as refresh() keeps a guess
    callback.load_state_dict({"coarse": {second.qid: [10, 20]}})  # as a resumed checkpoint restores them
    assert datamodule.collator.target_rounds(second, 0, 0)[0].start == 10
    assert first.qid not in datamodule.coarse_guesses


def test_a_grpo_stage_refreshes_no_on_policy_guesses(tmp_path):
    """Before (review): a GRPO stage from a run trained on-policy kept the callback, which predicted
    num_samples training queries every every_n_steps steps for targets that GRPO never reads."""
    cfg = load_config([*tiny_build_overrides(tmp_path), "model.refine.on_policy.fraction=1"])
    cfg.grpo.enabled = True  # as init_from_run's supervised config, which load_config would check
    callbacks = build_callbacks(cfg, tmp_path, OmegaConf.to_object(cfg.model.refine))
    assert not [c for c in callbacks if isinstance(c, OnPolicyCoarse)]


def test_a_grpo_run_keeps_its_kl_reference_to_train_not_to_evaluate(tmp_path):
    """Before: evaluate.py and predict built a GRPO run's module with its KL reference, a frozen copy
    of the whole model that only training reads (a second LM in memory)."""
    cfg = load_config(tiny_build_overrides(tmp_path))
    cfg.grpo.enabled = True  # as init_from_run's supervised config, which load_config would check
    datamodule = build_datamodule(cfg)
    assert build_module(cfg, datamodule).reference_digest() is not None
    assert build_module(cfg, datamodule, training=False).reference_digest() is None


def test_frames_per_token_need_not_divide_the_data_frames(tmp_path):
    """DiDeMo's 30 frames at 4 per token: 8 video tokens, the last one's two missing frames zero."""
    cfg = load_config(
        [*tiny_build_overrides(tmp_path), "model.projector.frames_per_token=4", "data.source.num_frames=30"]
    )
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule)
    assert datamodule.collator.video_tokens == 8 == module.model.projector.time.num_embeddings


def test_saliency_loss_trains_the_query_conditioning(tmp_path):
    cfg = load_config(
        [
            *tiny_build_overrides(tmp_path),
            "model.projector.query_conditioned=true",
            "model.saliency.weight=0.5",
        ]
    )
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    module = build_module(cfg, datamodule)
    batch = datamodule.collator([datamodule.datasets["train"][(0, i)] for i in range(4)])
    losses = module._losses(batch)
    assert {"lm_loss", "aux_loss", "saliency_loss", "loss"} <= losses.keys()
    expected = losses["lm_loss"] + losses["aux_loss"] + 0.5 * losses["saliency_loss"]
    assert torch.allclose(losses["loss"], expected)
    losses["saliency_loss"].backward()
    assert module.model.projector.film.weight.grad.abs().sum() > 0  # the query reaches the frames


def test_saliency_needs_query_conditioning(tmp_path):
    overrides = ["model.saliency.weight=1.0", "model.projector.query_conditioned=false"]
    with pytest.raises(ConfigError, match="query_conditioned=true"):
        load_config([*tiny_build_overrides(tmp_path), *overrides])
