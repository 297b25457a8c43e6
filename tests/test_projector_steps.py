"""``model.saliency.projector_steps``: the first steps train the projector and the saliency head alone,
on the saliency loss and without the LM's pass; the LR curve of the LM's steps starts after them."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

import train
from lightning_modules.grounding_module import GroundingModule
from timerefine.pipeline.build import build_datamodule, build_module, build_trainer
from timerefine.pipeline.config import ConfigError, load_config, load_run_config
from timerefine.pipeline.init_from_run import train_config
from timerefine.pipeline.training_rules import training_refusal

TINY = ["experiment=tiny", "data.source.num_train=16", "model.optim.warmup_steps=2"]
FIRST_STEPS = 2


def fitted(steps: int, *overrides: str) -> tuple[GroundingModule, dict[str, torch.Tensor]]:
    """The tiny model after ``steps`` optimizer steps with FIRST_STEPS projector steps, and its start."""
    cfg = load_config([*TINY, f"model.saliency.projector_steps={FIRST_STEPS}", *overrides])
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule)
    start = {name: p.detach().clone() for name, p in module.named_parameters()}
    trainer = L.Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule)
    return module, start


def changed(module: GroundingModule, start: dict[str, torch.Tensor]) -> set[str]:
    """The parts (``projector``, ``lm``, ...) of which some weight moved; the LM's input embeddings,
    which the query-conditioned projector reads, as ``embeddings``."""
    input_embeddings = module.model.lm.get_input_embeddings().weight
    return {
        "embeddings" if p is input_embeddings else name.split(".")[1]
        for name, p in module.named_parameters()
        if not torch.equal(p.detach(), start[name])
    }


def test_the_first_steps_train_the_projector_alone_and_the_lm_after_them():
    module, start = fitted(FIRST_STEPS)
    assert changed(module, start) == {"projector", "saliency_head", "embeddings"}
    module, start = fitted(FIRST_STEPS + 1)
    assert changed(module, start) == {"projector", "saliency_head", "embeddings", "lm", "aux_head"}


def test_tied_embeddings_stay_out_of_the_projector_steps():
    """Tied to the output layer, the embedding rows would be trained on the saliency loss alone, at the
    full lr, for every projector step: a from-scratch SmolLM2 (tied) began its LM steps at loss 42
    (ln 49,152 = 10.8 at random) and never learned the answers (bench/RESULTS.md)."""
    module, start = fitted(FIRST_STEPS, "model.lm.tiny.tie_word_embeddings=true")
    lm = module.model.lm
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    assert changed(module, start) == {"projector", "saliency_head"}
    module, start = fitted(FIRST_STEPS + 1, "model.lm.tiny.tie_word_embeddings=true")
    assert {"embeddings", "lm", "aux_head"} <= changed(module, start)


def test_the_lr_curve_of_the_lm_starts_after_the_projector_steps():
    module, _ = fitted(FIRST_STEPS + 1)
    curve = module.trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0]
    # full lr for the projector's steps, then the warmup (2 steps) and the cosine from the first LM step
    assert [curve(step) for step in range(FIRST_STEPS + 2)] == [1.0, 1.0, 0.5, 1.0]


def test_the_projector_steps_loss_is_the_saliency_loss_of_a_full_step():
    cfg = load_config([*TINY, f"model.saliency.projector_steps={FIRST_STEPS}"])
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    module = build_module(cfg, datamodule)
    batch = datamodule.collator([datamodule.datasets["train"][(0, i)] for i in range(4)])
    projector_only = module._projector_losses(batch)
    assert torch.allclose(projector_only["loss"], module._losses(batch)["saliency_loss"])


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["model.saliency.projector_steps=2", "model.saliency.weight=0"], "model.saliency.projector_steps"),
        (["model.saliency.projector_steps=20", "trainer.max_steps=20"], "trainer.max_steps"),
        (["model.saliency.projector_steps=-1"], "model.saliency.projector_steps"),
    ],
)
def test_projector_steps_that_cannot_run_are_refused_in_one_line(overrides, key):
    with pytest.raises(ConfigError) as error:
        load_config(["experiment=tiny", *overrides])
    assert str(error.value).startswith(key) and "\n" not in str(error.value)


def test_projector_steps_with_a_frozen_projector_are_refused_where_a_run_trains(tmp_path):
    """Before (review): the steps trained the saliency head alone, which serves only the projector. A
    run trained so before the rule still loads (evaluate, export, the API): the diff review."""
    given = ["experiment=tiny", "model.saliency.projector_steps=2", "model.trainable.projector=false"]
    assert training_refusal(load_config(given)) == (
        "model.saliency.projector_steps=2 train the projector, which model.trainable.projector=false "
        "freezes: set it to 0"
    )
    assert train.main([*given, f"output_dir={tmp_path / 'run'}"]) == 2
    assert not (tmp_path / "run").exists()


def test_more_than_one_process_needs_ddp_that_allows_the_unused_lm(tmp_path):
    overrides = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp_spawn"]
    cfg = load_config([*TINY, "model.saliency.projector_steps=2", *overrides, f"output_dir={tmp_path}"])
    datamodule = build_datamodule(cfg)
    with pytest.raises(
        ConfigError, match=r"^model.saliency.projector_steps=2 with 2 processes needs trainer.strategy=ddp"
    ):
        build_trainer(cfg, tmp_path, build_module(cfg, datamodule))


def test_a_run_saved_before_projector_steps_keeps_running_without_them(tmp_path):
    """Its config.yaml has no such key: today's default (600) would turn its first steps, on resume,
    into projector steps, and refuse its 540 steps as too few."""
    saved = OmegaConf.to_container(
        load_config(["model.saliency.projector_steps=0", "trainer.max_steps=540", f"output_dir={tmp_path}"])
    )
    del saved["model"]["saliency"]["projector_steps"]
    OmegaConf.save(OmegaConf.create(saved), tmp_path / "config.yaml")
    assert load_run_config(tmp_path, []).model.saliency.projector_steps == 0


@pytest.mark.parametrize(("given", "steps"), [([], 0), (["model.saliency.projector_steps=3"], 3)])
def test_a_run_that_starts_from_another_takes_no_projector_steps_unless_given(tmp_path, given, steps):
    start = tmp_path / "start"
    (start / "checkpoints").mkdir(parents=True)
    OmegaConf.save(load_config([*TINY, "model.saliency.projector_steps=5"]), start / "config.yaml")
    overrides = [*TINY, f"init_from_run={start}", *given]
    assert train_config(overrides).model.saliency.projector_steps == steps


def test_projector_steps_given_to_a_stage_must_leave_steps_for_the_lm(tmp_path):
    start = tmp_path / "start"
    (start / "checkpoints").mkdir(parents=True)
    OmegaConf.save(load_config(TINY), start / "config.yaml")
    overrides = [*TINY, f"init_from_run={start}", "model.saliency.projector_steps=20"]
    with pytest.raises(ConfigError, match=r"^trainer.max_steps=20 leaves no step for the LM"):
        train_config(overrides)
