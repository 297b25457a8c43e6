"""Runs that start from another run (``init_from_run``) and per-part freezing (``model.trainable``):
a two-stage chain on the tiny model, as the official recipe chains its stages (stage B continues
stage A's adapters with the head frozen)."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import train
from lightning_modules.grounding_module import GroundingModule
from lightning_modules.language_model import LMSpec, LoraSpec, build_language_model, grounding_token_ids
from lightning_modules.tokenizer import train_local_tokenizer
from tests import helpers
from timerefine import evaluate
from timerefine.pipeline.best_checkpoint import checkpoint_path
from timerefine.pipeline.build import build_datamodule, build_module
from timerefine.pipeline.config import ConfigError, load_config
from timerefine.pipeline.init_from_run import train_config
from timerefine.pipeline.training_rules import half_weights_trained

TINY = [
    "experiment=tiny",
    "data.source.num_train=16",
    "data.source.num_val=4",
    "data.source.num_test=4",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
]
FROZEN_IN_B = ["model.trainable.aux_head=false", "model.trainable.projector=false"]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint_path(run, "best"), map_location="cpu", weights_only=False)["state_dict"]


def parts(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    return {
        "lora": {k: v for k, v in state.items() if "lora_" in k},
        "projector": {k: v for k, v in state.items() if k.startswith("model.projector.")},
        "aux head": {k: v for k, v in state.items() if k.startswith("model.aux_head.")},
        "base": {k: v for k, v in state.items() if k.startswith("model.lm.") and "base_layer" in k},
    }


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def built(overrides: list[str]) -> GroundingModule:
    cfg = train_config(overrides)
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    return build_module(cfg, datamodule)


@pytest.fixture(scope="module")
def stage_a(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("stage_a")
    assert train.main([*TINY, "model.lora.enabled=true", f"output_dir={run}"]) == 0
    return run


@pytest.mark.slow
def test_stage_b_continues_stage_a_and_keeps_its_frozen_parts(stage_a, tmp_path, caplog):
    overrides = [*TINY, f"init_from_run={stage_a}", *FROZEN_IN_B]
    start = built(overrides)  # the model settings (LoRA on) come from stage A
    assert same(start.state_dict(), weights(stage_a))
    trains = {n.split(".")[1] for n, p in start.named_parameters() if p.requires_grad}
    assert trains == {"lm", "saliency_head"}
    caplog.set_level(logging.INFO)
    assert train.main([*overrides, f"output_dir={tmp_path / 'b'}"]) == 0
    assert "projector        frozen" in caplog.text and "aux head         frozen" in caplog.text
    before, after = parts(weights(stage_a)), parts(weights(tmp_path / "b"))
    assert not same(before["lora"], after["lora"])  # the same adapters, trained on
    for frozen in ("projector", "aux head", "base"):
        assert before[frozen] and same(before[frozen], after[frozen]), frozen
    assert evaluate.main([str(tmp_path / "b")]) == 0  # rebuilt from stage A, then its own checkpoint


def test_zero_steps_from_a_run_test_its_best_checkpoint(stage_a, tmp_path):
    """docs/protocols.md's zero-shot stage (``init_from_run=<run> trainer.max_steps=0``): no step, and
    the validation and test scores of the run's best checkpoint."""
    assert (
        train.main([*TINY, f"init_from_run={stage_a}", "trainer.max_steps=0", f"output_dir={tmp_path}"]) == 0
    )
    source, zero = (json.loads((run / "metrics.json").read_text()) for run in (stage_a, tmp_path))
    assert zero["global_step"] == 0
    for key in ("val/mIoU", "test/mIoU", "test/R1@0.5", "test/parse_fail"):
        assert zero[key] == source[key], key


def test_merge_puts_new_adapters_on_the_merged_model(stage_a):
    continued = built([*TINY, f"init_from_run={stage_a}"]).eval()
    merged = built([*TINY, f"init_from_run={stage_a}", "model.lora.inherited=merge"]).eval()
    fresh = parts(merged.state_dict())["lora"]
    assert fresh and all(v.eq(0).all() for k, v in fresh.items() if "lora_B" in k)
    batch = helpers.batch(n=2)
    ids = batch["input_ids"].clamp(max=len(continued.tokenizer) - 1)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        a = continued.model.lm(input_ids=ids, attention_mask=mask).logits
        b = merged.model.lm(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_merge_takes_new_adapter_settings_and_merges_at_the_runs_own(stage_a):
    """Before: the model was built with the new alpha, so stage A's adapters merged at 64/16, not
    their 32/16 (a silently other starting model), and a new rank was refused as a misfit."""
    continued = built([*TINY, f"init_from_run={stage_a}"]).eval()
    given = ["model.lora.inherited=merge", "model.lora.alpha=64", "model.lora.r=4"]
    merged = built([*TINY, f"init_from_run={stage_a}", *given]).eval()
    fresh = parts(merged.state_dict())["lora"]
    assert {tuple(v.shape) for k, v in fresh.items() if "lora_A" in k} <= {(4, 32), (4, 64)}
    ids = helpers.batch(n=2)["input_ids"].clamp(max=len(continued.tokenizer) - 1)
    with torch.no_grad():
        a, b = (
            m.model.lm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits for m in (continued, merged)
        )
    assert torch.allclose(a, b, atol=1e-5)


def trainable(module: GroundingModule) -> list[str]:
    return [name for name, param in module.named_parameters() if param.requires_grad]


def test_merge_without_new_adapters_trains_the_merged_lm(stage_a):
    """Before (with the merge settings above): stage A's adapters stayed on, unmerged, and trained on;
    then the merged LM stayed frozen as peft had left it (only the projector and heads trained)."""
    continued = built([*TINY, f"init_from_run={stage_a}"]).eval()
    merged = built(
        [*TINY, f"init_from_run={stage_a}", "model.lora.inherited=merge", "model.lora.enabled=false"]
    )
    assert not parts(merged.state_dict())["lora"]
    fresh = built(TINY)  # no LoRA: the whole LM trains
    assert trainable(merged) == trainable(fresh)
    assert any(name.startswith("model.lm.") for name in trainable(merged))
    ids = helpers.batch(n=2)["input_ids"].clamp(max=len(continued.tokenizer) - 1)
    with torch.no_grad():
        a, b = (
            m.model.lm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            for m in (continued, merged.eval())
        )
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize(
    "given", ["model.lora.alpha=64", "model.lora.r=8", "model.lora.target_modules=[q_proj]"]
)
def test_continued_adapters_keep_their_settings(stage_a, tmp_path, capsys, given):
    """Before: another alpha scaled stage A's adapters silently; another rank failed as a misfit."""
    assert train.main([*TINY, f"init_from_run={stage_a}", given, f"output_dir={tmp_path}"]) == 2
    name = given.split("=")[0].split(".")[-1]
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"config error: model.lora.{name}="), lines
    assert f"the adapters of init_from_run={stage_a} were trained with {name}=" in lines[0]
    assert "set model.lora.inherited=merge" in lines[0]
    assert not (tmp_path / "config.yaml").exists()


def test_continued_adapters_need_lora(stage_a, tmp_path, capsys):
    """Before: the LM was built without LoRA and stage A's checkpoint refused as another model's
    (``error: ... it lacks model.lm.lm_head.weight: not a model of this run's settings``)."""
    given = [*TINY, f"init_from_run={stage_a}", "model.lora.enabled=false", f"output_dir={tmp_path}"]
    assert train.main(given) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: model.lora.enabled=false: "), lines
    assert "model.lora.inherited=continue" in lines[0] and "needs model.lora.enabled=true" in lines[0]
    assert "model.lora.inherited=merge" in lines[0]
    assert not (tmp_path / "config.yaml").exists()


def test_new_adapters_on_a_run_without_lora_are_not_continued(tmp_path, capsys):
    """Before: ``error: ... it lacks model.lm.base_model...base_layer.weight: not a model of this run's
    settings``, naming the start's checkpoint."""
    start = config_only_run(tmp_path / "a", TINY)
    given = [*TINY, f"init_from_run={start}", "model.lora.enabled=true", f"output_dir={tmp_path / 'b'}"]
    assert train.main(given) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"config error: model.lora.enabled=true: the LM of init_from_run={start} was trained without LoRA, so "
        "model.lora.inherited=continue has no adapters to train on; set model.lora.inherited=merge for new ones"
    ]


def test_a_start_says_which_checkpoint_and_whether_its_run_finished(stage_a, tmp_path, caplog):
    """Before: a run stopped half-way (no metrics.json) was started from without a word, and a merge
    stage was warned that init_from_run "trained with model.lora.inherited=continue"."""
    unfinished = tmp_path / "a"
    shutil.copytree(stage_a, unfinished)
    (unfinished / "metrics.json").unlink()
    with caplog.at_level(logging.INFO):
        built([*TINY, f"init_from_run={unfinished}", "model.lora.inherited=merge"])
    best = checkpoint_path(unfinished, "best")
    assert f"init_from_run={unfinished}: starting from {best}" in caplog.text
    assert f"init_from_run={unfinished} has not finished (no metrics.json)" in caplog.text
    assert "trained with model.lora.inherited" not in caplog.text


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["init_from_run=/nonexistent"], "init_from_run=/nonexistent: /nonexistent is not a run directory"),
        (["model=direct"], "model=...: init_from_run takes its run's model settings"),
        (
            ["model.trainable.token_rows=false", "model.lora.enabled=false", "model.lora.inherited=merge"],
            "model.trainable.token_rows=false needs lora.enabled=true",
        ),
        (["model.lora.inherited=???"], "model.lora.inherited: no value given"),  # before: a traceback
        # before: accepted and recorded in config.yaml, while the run's own tokenizer was used
        (["model.lm.tokenizer_vocab_size=500"], "model.lm.tokenizer_vocab_size=500: a run started from"),
    ],
)
def test_config_mistakes_name_the_key(stage_a, overrides, message):
    given = [*TINY, f"init_from_run={stage_a}", *overrides]
    with pytest.raises(ConfigError, match=re.escape(message)):
        train_config(given)


def test_a_missing_relative_start_says_where_it_was_looked_for(tmp_path, monkeypatch):
    """Before: "runs/a is not a run directory", though it may be one, relative to another folder."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as error:
        train_config([*TINY, "init_from_run=runs/a"])
    assert str(error.value) == (
        f"init_from_run=runs/a: runs/a is not a run directory (config.yaml and checkpoints/), relative to {tmp_path}"
    )


def test_a_merged_lm_in_bfloat16_does_not_train_whole(stage_a, tmp_path):
    """Before: a LoRA run's bf16 LM, merged with no new adapters, trained whole in bf16 (its weights
    and AdamW's master weights in bf16). The dtype comes from the run, not from the command line."""
    run = tmp_path / "bf16_run"
    (run / "checkpoints").mkdir(parents=True)
    config = (stage_a / "config.yaml").read_text()
    assert "dtype: float32" in config
    (run / "config.yaml").write_text(config.replace("dtype: float32", "dtype: bfloat16"))
    given = [*TINY, f"init_from_run={run}", "model.lora.inherited=merge"]
    assert train_config(given).model.lm.dtype == "bfloat16"  # new adapters: fine
    given.append("model.lora.enabled=false")
    half = half_weights_trained(train_config(given))
    assert half.startswith("model.lm.dtype=bfloat16 with model.lora.enabled=false: ")


def test_a_tokenizer_of_another_model_is_refused(tmp_path):
    """Before: accepted in silence, and every token id read another token's embedding row."""
    helpers.pretrained_lm(tmp_path / "llama")
    train_local_tokenizer(["other words entirely", "grounding text"], 280).save_pretrained(tmp_path / "other")
    lm = [*TINY, f"model.lm.name_or_path={tmp_path / 'llama'}", "model.lora.enabled=true"]
    assert build_datamodule(load_config([*lm, f"model.lm.tokenizer={tmp_path / 'llama'}"])).codec
    with pytest.raises(ConfigError, match=rf"^model.lm.tokenizer={tmp_path / 'other'}: not the tokenizer of"):
        build_datamodule(load_config([*lm, f"model.lm.tokenizer={tmp_path / 'other'}"]))


@pytest.mark.parametrize("init", ["mean", "resize"])
def test_new_token_rows_start_at_the_mean_or_as_resized(tmp_path, init):
    tokenizer = helpers.pretrained_lm(tmp_path)
    lm = build_language_model(tokenizer, LMSpec(str(tmp_path), token_rows_init=init), None)
    rows = lm.get_input_embeddings().weight
    ids = grounding_token_ids(tokenizer)
    others = torch.ones(len(tokenizer), dtype=torch.bool)
    others[ids] = False
    at_mean = torch.allclose(rows[ids], rows[others].mean(0).expand(len(ids), -1))
    assert at_mean == (init == "mean")


@pytest.mark.parametrize("train_rows", [True, False])
def test_token_rows_train_only_when_asked(tmp_path, train_rows):
    tokenizer = helpers.pretrained_lm(tmp_path)
    spec = LMSpec(str(tmp_path))
    lm = build_language_model(tokenizer, spec, LoraSpec(r=2), train_token_rows=train_rows)
    rows = [n for n, p in lm.named_parameters() if p.requires_grad and "trainable_tokens" in n]
    assert bool(rows) == train_rows


@pytest.mark.slow
@pytest.mark.parametrize("lm", ["tiny", "pretrained"])
def test_an_export_of_a_later_stage_needs_not_the_run_it_started_from(stage_a, tmp_path, lm):
    """Before: the export's config named init_from_run, so it did not load once that run was gone (and
    of a pretrained LM it held the trained parts alone: not the frozen ones, not the merged LM)."""
    from timerefine.inference.grounder import Grounder
    from timerefine.tools.export import main as export_main

    source = tmp_path / "a"
    if lm == "tiny":
        shutil.copytree(stage_a, source)
    else:
        helpers.pretrained_lm(tmp_path / "llama")
        given = ["model.lora.enabled=true", f"model.lm.name_or_path={tmp_path / 'llama'}"]
        assert train.main([*TINY, *given, f"output_dir={source}"]) == 0
    stage_b = tmp_path / "b"
    merge = ["model.lora.inherited=merge", "model.lora.r=4"]  # the LM's own weights change: merged
    assert train.main([*TINY, f"init_from_run={source}", *merge, *FROZEN_IN_B, f"output_dir={stage_b}"]) == 0
    assert export_main([str(stage_b), str(tmp_path / "export")]) == 0
    expected = Grounder.from_run(stage_b).run.module.state_dict()
    shutil.rmtree(source)
    found = Grounder.from_export(tmp_path / "export").run.module.state_dict()
    assert sorted(found) == sorted(expected)
    assert [name for name in found if not torch.equal(found[name], expected[name])] == []


def test_a_start_on_other_data_says_so(stage_a, caplog):
    """Before: a GRPO stage or second stage without its data= trained on the built-in data in silence."""
    given = ["data=charades_sta", f"init_from_run={stage_a}"]
    with caplog.at_level(logging.WARNING):
        train_config(given)
    assert f"init_from_run={stage_a} trained on data.name=builtin; this run reads charades_sta" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        train_config([*TINY, f"init_from_run={stage_a}"])
    assert "trained on data.name" not in caplog.text


def config_only_run(folder: Path, overrides: list[str]) -> Path:
    """A run folder holding its config.yaml (all inherit_settings reads) and no checkpoint."""
    (folder / "checkpoints").mkdir(parents=True)
    OmegaConf.save(load_config([*overrides, f"output_dir={folder}"]), folder / "config.yaml")
    return folder


@pytest.mark.parametrize(
    ("trained", "stage", "inherited"),
    [  # before: each stage took its own config's features and seed, features that mean something else
        (
            ["experiment=charades_actions", "data.source.seed=3"],
            ["data=charades_sta", "data.source.root=../shared/data/charades_sta"],
            {"data.source.features": "action_trace", "data.source.seed": 3},
        ),
        ([*TINY, "data.source.seed=5"], TINY, {"data.source.seed": 5}),
        (
            ["data=charades_sta", "data.source.features=synthetic", "data.source.seed=2"],
            ["data=activitynet"],  # the same word vectors on other data
            {"data.source.features": "synthetic", "data.source.seed": 2},
        ),
        (
            ["data=charades_sta", "data.source.features=folder", "data.source.feature_path=a"],
            ["data=charades_sta", "data.source.features=packed", "data.source.feature_path=b"],
            {"data.source.features": "packed", "data.source.seed": 0},  # the same vectors, packed
        ),
    ],
)
def test_a_stage_reads_features_that_mean_what_they_meant(tmp_path, caplog, trained, stage, inherited):
    run = config_only_run(tmp_path / "run", trained)
    given = [*stage, f"init_from_run={run}"]
    cfg = train_config(given)
    assert {key: OmegaConf.select(cfg, key) for key in inherited} == inherited
    given = [*given, "data.source.seed=7"]  # given on the command line: still applies, and says so
    with caplog.at_level(logging.WARNING):
        assert train_config(given).data.source.seed == 7
    generated = "data.source.features=folder" not in trained  # stored features: the seed means nothing
    warned = (
        f"init_from_run={run} trained with data.source.seed={inherited['data.source.seed']}; this run sets 7"
    )
    assert (warned in caplog.text) == generated


@pytest.mark.slow
def test_a_run_that_never_validated_starts_a_stage_from_its_last_checkpoint(tmp_path, caplog):
    """Before: 'records no best checkpoint (no validation yet?); try --ckpt last', an option train.py
    has not (a shortened experiment=smollm2 run validates first at step 1750)."""
    first = tmp_path / "first"
    assert train.main([*TINY, "trainer.limit_val_batches=0", f"output_dir={first}"]) == 0
    with caplog.at_level(logging.INFO):
        assert train.main([*TINY, f"init_from_run={first}", f"output_dir={tmp_path / 'next'}"]) == 0
    assert f"starting from {first / 'checkpoints' / 'last.ckpt'}" in caplog.text


def test_a_stage_after_stored_features_does_not_fall_back_to_synthetic(tmp_path):
    run = config_only_run(
        tmp_path / "run", ["data=charades_sta", "data.source.features=folder", "data.source.feature_path=a"]
    )
    given = ["data=charades_sta", f"init_from_run={run}"]  # no features given: synthetic by default
    with pytest.raises(ConfigError, match="features=folder needs feature_path"):
        train_config(given)
