"""Config composition and overrides (pipeline.config) and train.py's error exit."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import train
from timerefine.pipeline.config import CONF_DIR, ConfigError, load_config
from timerefine.pipeline.training_rules import half_weights_trained, training_refusal

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_load():
    cfg = load_config([])
    assert cfg.data.name == "builtin"
    assert cfg.model.refine.steps == 3 and cfg.model.aux.weight > 0
    assert cfg.seed == 0 and cfg.resume == "auto" and cfg.test is True
    assert isinstance(cfg.trainer.max_steps, int)
    assert cfg.output_dir.startswith("runs/") and "${" not in cfg.output_dir  # resolved
    schedule = OmegaConf.to_object(cfg.model.refine)
    assert schedule.steps == 3 and len(schedule.stds()) == 4
    assert schedule.residual_stds() == [0.0] * 4  # the reference: every offset lands on the truth


def test_overrides_apply():
    cfg = load_config(
        [
            "data=builtin",
            "model=direct",
            "model.lora.r=8",
            "trainer.max_steps=700",
            "seed=3",
            "output_dir=runs/x",
        ]
    )
    assert cfg.model.lora.r == 8
    assert cfg.trainer.max_steps == 700
    assert cfg.seed == 3
    assert cfg.output_dir == "runs/x"
    # Everything else keeps its default.
    default = load_config(["model=direct"])
    for key in ("data", "logger", "callbacks"):
        assert OmegaConf.to_container(cfg[key]) == OmegaConf.to_container(default[key])


def test_direct_model_turns_refinement_and_aux_off():
    cfg = load_config(["model=direct"])
    assert cfg.model.refine.steps == 0
    assert cfg.model.aux.weight == 0
    # The rest of the model group is inherited from timerefine.
    timerefine = load_config([])
    assert cfg.model.lm == timerefine.model.lm and cfg.model.optim == timerefine.model.optim


def test_list_and_float_overrides():
    cfg = load_config(["model.refine.noise_std=[4,2,0]", "model.optim.lr=0.01", "model.optim.lr=1"])
    assert list(cfg.model.refine.noise_std) == [4, 2, 0]
    assert cfg.model.optim.lr == 1  # an int for a float key is fine
    schedule = OmegaConf.to_object(load_config(["model.refine.residual_std=[3,1,0.5,0]"]).model.refine)
    assert schedule.residual_stds() == [3, 1, 0.5, 0]


@pytest.mark.parametrize("key", ["foo.bar", "model.lora.rank", "trainer.max_stepz", "data.source.num_trains"])
def test_unknown_key_names_the_key(key):
    with pytest.raises(ConfigError) as error:
        load_config([f"{key}=1"])
    assert key in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("trainer.max_steps=abc", "trainer.max_steps"),
        ("trainer.max_steps=1.5", "trainer.max_steps"),
        ("model.lora.enabled=1", "model.lora.enabled"),
        ("model.refine.noise_std=3", "model.refine.noise_std"),
        ("seed=three", "seed"),
    ],
)
def test_wrong_type_raises(override, key):
    with pytest.raises(ConfigError) as error:
        load_config([override])
    assert key in str(error.value)


@pytest.mark.parametrize(
    "override", ["model=nope", "data=imaginary", "trainer=tpu_pod", "experiment=paper/x"]
)
def test_unknown_group_option_raises(override):
    """It names the options, without Hydra's config search path (review: a line of noise)."""
    with pytest.raises(ConfigError) as error:
        load_config([override])
    assert str(error.value).startswith(f"{override}: no such option; the options: ")
    assert "search path" not in str(error.value)
    with pytest.raises(ConfigError, match=r"model/x") as error:  # an option in a list
        load_config(["model=[direct,x]"])
    assert "search path" not in str(error.value)


@pytest.mark.parametrize("data", ["charades_sta", "jsonl"])
def test_the_documented_annotation_file_overrides_compose(data):
    """docs/datasets.md gave ``data.source.annotation_files={train: ...}``, which Hydra refuses (a key
    added to a mapping in struct mode needs ``+``)."""
    documented = re.findall(
        r"`([^`\s]*data\.source\.annotation_files[^`\s]*=[^`\s]+)`",
        (ROOT / "docs" / "datasets.md").read_text(),
    )
    assert documented
    for override in documented:
        file = OmegaConf.select(load_config([f"data={data}", override]), "data.source.annotation_files.train")
        assert file == override.split("=", 1)[1]


def test_train_py_reports_config_errors_in_one_line():
    result = subprocess.run(
        [sys.executable, "train.py", "trainer.max_steps=abc"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("config error:")]
    assert len(errors) == 1 and "trainer.max_steps" in errors[0]
    assert [line for line in result.stderr.splitlines() if line.strip()] == errors


def test_device_list_and_float_intervals_are_accepted():
    given = ["trainer.val_check_interval=0.5", "trainer.check_val_every_n_epoch=1"]
    cfg = load_config(["trainer.devices=[0,1]", *given, "trainer.devices=auto"])
    assert cfg.trainer.devices == "auto" and cfg.trainer.val_check_interval == 0.5
    assert list(load_config(["trainer.devices=[0,1]"]).trainer.devices) == [0, 1]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.refine.steps=-1", "model.refine.steps"),
        ("model.refine.steps=null", "model.refine.steps"),
        ("model.refine.noise_std=[]", "model.refine.noise_std"),
        ("model.refine.noise_std=[3,-1]", "model.refine.noise_std"),
        ("model.refine.residual_std=[-1]", "model.refine.residual_std"),
        ("model.refine.on_policy.fraction=1.5", "model.refine.on_policy.fraction"),
        ("data.batch_size=0", "data.batch_size"),
        ("data.global_batch_size=0", "data.global_batch_size"),
        ("data.source.num_test=0", "data.source.num_test"),
        ("data.source.min_events=5", "data.source.min_events"),  # more than max_events (4)
        ("model.lora.dropout=1.5", "model.lora.dropout"),
        ("model.lora.target_modules=[]", "model.lora.target_modules"),
        ("model.init_from.adapters=['']", "model.init_from.adapters"),
        ("model.init_from.added_tokens=[]", "model.init_from.added_tokens"),
        ("model.init_from.projector=''", "model.init_from.projector"),
        ("model.optim.lr=0", "model.optim.lr"),
        ("model.optim.betas=[0.9]", "model.optim.betas"),
        ("model.optim.min_lr_ratio=2", "model.optim.min_lr_ratio"),
        ("model.aux.loss=l2", "model.aux.loss"),
        ("model.inference.final=first", "model.inference.final"),
        ("callbacks.progress_bar=fancy", "callbacks.progress_bar"),
        ("callbacks.checkpoint.last_every_n_steps=0", "callbacks.checkpoint.last_every_n_steps"),
        ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps"),
        ("seed=-1", "seed"),
        # not finite: accepted before, trained to a NaN loss or crashed in the targets
        ("model.optim.lr=inf", "model.optim.lr"),
        ("model.aux.weight=inf", "model.aux.weight"),
        ("model.refine.noise_std=[inf]", "model.refine.noise_std"),
        ("model.refine.residual_std=[inf]", "model.refine.residual_std"),
        ("data.source.noise=inf", "data.source.noise"),
        ("trainer.gradient_clip_val=inf", "trainer.gradient_clip_val"),
        ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val"),
        ("output_dir=", "output_dir"),  # empty: wrote the run into the working directory
        ("resume=", "resume"),  # was "checkpoint . cannot be read"
        ("hydra.run.dir=/tmp/x", "hydra.run.dir"),  # ignored before: the run went to output_dir
        ("hydra.job.chdir=true", "hydra.job.chdir"),
        ("trainer.limit_test_batches=0", "trainer.limit_test_batches"),  # printed a table without test
        ("model.inference.max_new_tokens=3", "model.inference.max_new_tokens"),  # ignored when constrained
        # tracebacks in transformers' config, or in the first step (an odd head size)
        ("model.lm.tiny.num_heads=3", "model.lm.tiny.hidden_size"),
        ("model.lm.tiny.num_heads=128", "model.lm.tiny.hidden_size"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as error:
        load_config([override])
    assert str(error.value).startswith(key) and "\n" not in str(error.value)


@pytest.mark.parametrize("overrides", [["model.aux.weight=0"], ["model=direct"]])
@pytest.mark.parametrize("final", ["aux", "mean_all"])
def test_a_final_answer_from_an_aux_head_the_model_lacks_is_refused(overrides, final):
    """Before: the last text segment was scored, and the run recorded final=aux."""
    with pytest.raises(ConfigError, match=f"^model.inference.final={final} reads the aux head, which"):
        load_config([*overrides, f"model.inference.final={final}"])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_an_lm_that_trains_whole_in_half_precision_is_refused(dtype, tmp_path):
    """Before: without LoRA the whole LM trained with its weights stored in bf16/fp16 (AdamW's master
    weights too), its small updates lost to rounding, in silence."""
    given = f"model.lm.dtype={dtype}"
    error = half_weights_trained(load_config([given]))
    assert error.startswith(f"{given} with model.lora.enabled=false: ")
    assert "model.lora.enabled=true" in error and "trainer.precision=bf16-mixed" in error
    assert half_weights_trained(load_config([given, "model.lora.enabled=true"])) is None
    assert half_weights_trained(load_config([given, "trainer.max_steps=0"])) is None  # evaluated as it is
    assert train.main([given, f"output_dir={tmp_path / 'run'}"]) == 2  # refused where a run trains
    # a run saved so before this rule still loads, to be evaluated or exported (a schema rule refused it)
    assert load_config([given]).model.lm.dtype == dtype
    assert train.main([given, "--cfg", "job"]) == 2  # was 0: --cfg job checks values as a run does
    random = half_weights_trained(
        load_config([given, "model.lm.weights=random", "model.lm.name_or_path=a/b"])
    )
    assert "model.lora.enabled=true" not in random  # which lm.weights=random refuses
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (["callbacks.checkpoint.monitor=val/loss"], "callbacks.checkpoint.mode=min"),
        (
            ["callbacks.checkpoint.monitor=val/step0/mIoU", "callbacks.checkpoint.mode=min"],
            "callbacks.checkpoint.mode=max",
        ),
        (["callbacks.early_stopping={monitor: train/loss, mode: max}"], "callbacks.early_stopping.mode=min"),
        (["callbacks.early_stopping={monitor: val/R1@0.5, mode: min}"], "callbacks.early_stopping.mode=max"),
    ],
)
def test_a_monitor_kept_the_wrong_way_round_is_refused(given, expected, tmp_path):
    """Before: ``monitor=val/loss`` took the default ``mode=max``: the run kept and tested its
    highest-loss checkpoint as the best, in silence (found by a review)."""
    error = training_refusal(load_config(given))
    assert error.endswith(f"so the run would keep its worst; set {expected}"), error
    assert train.main([*given, f"output_dir={tmp_path / 'run'}"]) == 2
    assert not (tmp_path / "run").exists()
    assert training_refusal(load_config([])) is None  # val/mIoU, max
    unknown = ["callbacks.early_stopping={monitor: train/reward_mean, mode: max}"]
    assert training_refusal(load_config(unknown)) is None  # a metric whose direction is not known here
    aux = ["callbacks.early_stopping={monitor: train/aux_loss, mode: max}"]
    assert training_refusal(load_config(aux)).endswith("set callbacks.early_stopping.mode=min")


def test_a_run_begun_before_the_monitor_rule_continues_as_it_began(tmp_path, monkeypatch, caplog):
    """The diff review: a run begun with ``monitor=val/loss`` under the old default ``mode=max`` could
    not be continued: as it was, the rule refused it; with ``mode=min``, the settings check did."""
    given = [
        "experiment=tiny",
        "trainer.val_check_interval=2",
        "callbacks.checkpoint.monitor=val/loss",
        "callbacks.refinement_trace=0",
        f"output_dir={tmp_path / 'run'}",
    ]
    with monkeypatch.context() as before_the_rule:
        before_the_rule.setattr("timerefine.pipeline.previous_run.training_refusal", lambda cfg: None)
        assert train.main([*given, "trainer.max_steps=2"]) == 0
    with caplog.at_level(logging.WARNING):
        assert train.main([*given, "trainer.max_steps=4"]) == 0
    assert (
        f"so the run would keep its worst; set callbacks.checkpoint.mode=min ({tmp_path / 'run'} "
        in caplog.text
    )
    assert train.main([*given[:-1], f"output_dir={tmp_path / 'new'}"]) == 2  # a new run is refused


def test_a_folder_begun_otherwise_is_no_way_past_the_rules(tmp_path):
    """The second diff review: a folder whose run only evaluated (``trainer.max_steps=0``, which the
    half-precision rule lets through) then trained its LM whole in bfloat16, warned of as "begun so"."""
    given = ["experiment=tiny", "model.lm.dtype=bfloat16", f"output_dir={tmp_path / 'run'}"]
    assert train.main([*given, "trainer.max_steps=0"]) == 0
    assert train.main([*given, "trainer.max_steps=2"]) == 2


@pytest.mark.parametrize(
    "override",
    [
        "model.refine.steps=0",
        "model.refine.residual_std=[]",
        "model.refine.on_policy.fraction=1",
        "data.global_batch_size=null",
        "model.inference.max_new_tokens=null",
        "trainer.max_steps=-1 trainer.max_epochs=8",  # experiment=paper_charades: epochs, not steps
        "callbacks.checkpoint.save_top_k=-1",
    ],
)
def test_boundary_values_are_accepted(override):
    load_config(override.split())


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("+model.refine.stepz=3", "model.refine.stepz"),
        ("++model.refine.stepz=3", "model.refine.stepz"),
        ("+trainer.foo=1", "trainer.foo"),
        ("+data.source.num_trains=5", "data.source.num_trains"),
    ],
)
def test_added_keys_nothing_reads_are_refused(override, key):
    with pytest.raises(ConfigError) as error:
        load_config([override])
    assert key in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("override", "source"),
    [
        ("+trainer.logger=false", "logger.*"),
        ("+trainer.default_root_dir=x", "output_dir"),
        ("trainer=fsdp +trainer.strategy.auto_wrap_policy=x", "auto_wrap"),
    ],
)
def test_arguments_the_builder_sets_name_their_keys(override, source):
    """Before: 'Trainer takes no argument 'logger'', which it does."""
    with pytest.raises(
        ConfigError, match=f"'s \\w+ is set from {re.escape(source)}, so this would not be read"
    ):
        load_config(override.split())


def test_an_experiment_for_another_dataset_is_named():
    """Before: Hydra's 'In 'experiment/tiny': ConfigKeyError raised while composing config: ...'."""
    with pytest.raises(ConfigError) as error:
        load_config(["experiment=tiny", "data=charades_sta"])
    assert str(error.value) == (
        "experiment=tiny sets data.source.num_train, which data=charades_sta lacks "
        "(Key 'num_train' not in 'CharadesSpec')"
    )


def test_a_typo_in_an_experiment_is_not_blamed_on_the_data(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "experiment" / "typo.yaml").write_text("# @package _global_\nmodel:\n  refine:\n    stepz: 2\n")
    with pytest.raises(ConfigError, match="stepz") as error:
        load_config(["experiment=typo", "data=builtin"], config_dir=conf)
    assert " lack" not in str(error.value)  # before: "... which the other choices lack ..."
    with pytest.raises(ConfigError) as error:
        load_config(["experiment=typo"], config_dir=conf)
    assert str(error.value) == (  # before: Hydra's 'In 'experiment/typo': ConfigKeyError raised ...' (review)
        "experiment=typo sets model.refine.stepz, which is not a config key (Key 'stepz' not in 'RefineConfig')"
    )


def test_added_keys_that_are_read_are_accepted():
    assert load_config(["+trainer.detect_anomaly=true"]).trainer.detect_anomaly is True  # a Trainer argument
    files = load_config(["data=charades_sta", "+data.source.annotation_files.test=fixed.txt"])
    assert files.data.source.annotation_files.test == "fixed.txt"


def test_deleting_a_key_is_refused():
    with pytest.raises(ConfigError, match=r"model\.saliency"):
        load_config(["~model.saliency"])


EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes(name):
    if name == "grpo":  # a stage after a supervised run: it names the run it needs
        with pytest.raises(ConfigError, match="needs init_from_run"):
            load_config([f"experiment={name}"])
    else:
        assert load_config([f"experiment={name}"]).data.name


def test_the_pretrained_lm_experiment_adds_to_the_action_trace_benchmark():
    both, actions, smollm2 = (
        load_config([f"experiment={name}"])
        for name in ("charades_actions_smollm2", "charades_actions", "smollm2")
    )
    assert both.data.source == actions.data.source and both.data.source.features == "action_trace"
    assert both.model == smollm2.model and both.trainer.max_steps == smollm2.trainer.max_steps
    assert both.callbacks.checkpoint.monitor is None  # tested at its last step, as charades_actions


def test_experiment_null_means_no_experiment():
    assert load_config(["experiment=null"]).trainer.max_steps == load_config([]).trainer.max_steps


def test_stored_features_need_a_path():
    with pytest.raises(ConfigError, match=r"data\.source\.features=folder needs feature_path"):
        load_config(["data=charades_sta", "data.source.features=folder"])
