"""evaluate.py: which checkpoint ``--ckpt best`` loads, the coverage it reports, and its one-line errors."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

import evaluate
from grounding.metrics.prior import prior_scores
from grounding.metrics.protocols import protocol_named
from tests import launched
from timerefine.inference.run_loading import load_run
from timerefine.inference.video_features import InputError
from timerefine.pipeline.build import build_datamodule
from timerefine.pipeline.config import ConfigError, load_config, load_run_config

# Validation at steps 5 and 10, both kept (save_top_k=2); monitoring the step itself makes step 10
# the best, while the names sort as strings the other way ("best-step10" < "best-step5").
RUN = [
    "experiment=tiny",
    "trainer.accelerator=cpu",
    "trainer.max_steps=10",
    "model.saliency.projector_steps=0",
    "trainer.val_check_interval=5",
    "callbacks.checkpoint.monitor=step",
    "callbacks.checkpoint.mode=max",
    "callbacks.checkpoint.save_top_k=2",
    "logger.csv=false",
    "logger.tensorboard=false",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("evaluate") / "run"
    result = launched.run(["train.py", *RUN, f"output_dir={output_dir}"], timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return output_dir


def eval_metrics(run: Path, name: str) -> dict:
    return json.loads((run / "eval" / name / "metrics.json").read_text())


@pytest.mark.slow
def test_best_is_the_recorded_best_checkpoint(run, capsys):
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("best-*.ckpt")) == ["best-step10.ckpt", "best-step5.ckpt"]
    assert evaluate.main([str(run), "--name", "best"]) == 0
    assert f"checkpoint: {checkpoints / 'best-step10.ckpt'}" in capsys.readouterr().out
    metrics = eval_metrics(run, "best")
    # train.py tested the best checkpoint its ModelCheckpoint knew: the same numbers.
    trained = json.loads((run / "metrics.json").read_text())
    assert metrics["test/mIoU"] == trained["test/mIoU"] and metrics["test/coverage"] == 100.0
    # which weights each scored (before: neither said; the run's global_step, 10, is not always the best's)
    scored = (metrics["checkpoint"], metrics["checkpoint/step"])
    assert scored == (trained["checkpoint"], 10) == ("checkpoints/best-step10.ckpt", 10)
    for key, value in metrics.items():  # float32 values are written as their shortest decimal
        baseline = key.startswith(("prior/", "best_action/"))  # float64 arithmetic, kept whole
        assert baseline or not isinstance(value, float) or repr(value) == str(np.float32(value))


@pytest.mark.slow
def test_partial_evaluation_reports_its_coverage(run, caplog):
    argv = [
        str(run),
        "--ckpt",
        "last",
        "--name",
        "partial",
        "trainer.limit_test_batches=1",
        "data.eval_batch_size=4",
    ]
    with caplog.at_level(logging.INFO):  # 1 batch of 4 of the 8 queries; the second replaces the first
        assert evaluate.main(argv) == evaluate.main(argv) == 0
    assert caplog.text.count(f"{run / 'eval' / 'partial'}: replacing the evaluation there") == 1
    metrics = eval_metrics(run, "partial")
    assert metrics["test/queries"] == 4 and metrics["test/coverage"] == 50.0
    evaluated = OmegaConf.load(run / "eval" / "partial" / "config.yaml")  # before: no trace of overrides
    assert evaluated.trainer.limit_test_batches == 1 and evaluated.data.eval_batch_size == 4


@pytest.mark.slow
def test_an_evaluation_reports_the_baselines_of_the_queries_it_tested(run, capsys):
    """Before: evaluate.py's metrics.json held no prior/* (README: every run reports the prior), so
    an evaluation (a leak check's, data.source.queries=empty) had nothing to be compared with."""
    assert evaluate.main([str(run), "--name", "baselines"]) == 0
    assert "vs best constant segment" in capsys.readouterr().out
    metrics, trained = eval_metrics(run, "baselines"), json.loads((run / "metrics.json").read_text())
    prior = {key: value for key, value in trained.items() if key.startswith("prior/")}
    assert prior and {key: metrics.get(key) for key in prior} == prior
    # one batch of 4 of the 8 queries, under another protocol: the prior of those 4, scored so
    overrides = ["trainer.limit_test_batches=1", "data.eval_batch_size=4", "eval.protocol=vtimellm"]
    assert evaluate.main([str(run), "--name", "baselines_part", *overrides]) == 0
    part = eval_metrics(run, "baselines_part")
    cfg = load_run_config(run, [])
    datamodule = build_datamodule(cfg, tokenizer_dir=run / "tokenizer")
    tested = {
        json.loads(line)["qid"]
        for line in (run / "eval" / "baselines_part" / "predictions" / "test.jsonl").open()
    }
    test = [r for r in datamodule.records("test") if r.qid in tested]
    expected = prior_scores(datamodule.records("train"), test, protocol_named("vtimellm"))
    assert len(test) == 4 and {k: part[f"prior/{k}"] for k in expected} == pytest.approx(expected, abs=1e-4)


@pytest.mark.slow
def test_a_test_fraction_under_one_batch_is_one_line(run, capsys):
    """Before: Lightning's MisconfigurationException as a traceback once the test loop started."""
    assert evaluate.main([str(run), "--name", "fraction", "trainer.limit_test_batches=0.5"]) == 2
    line = one_error_line(capsys, "error: trainer.limit_test_batches=0.5: 0.5 of the 1 test batches")
    assert line.endswith("use at least 1, or a whole number of batches")
    assert not (run / "eval" / "fraction").exists()


@pytest.mark.slow
def test_an_eval_folder_that_is_a_file_is_one_line(tmp_path, run, capsys):
    """Before: NotADirectoryError as a traceback when the metrics were written, after the test."""
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("eval"))
    (copy / "eval").write_text("notes")
    assert evaluate.main([str(copy)]) == 2
    reason = f"{copy / 'eval'} is a file, so no directory can be made below it"
    assert one_error_line(capsys, "error: --name test:") == f"error: --name test: {reason}"


@pytest.mark.slow
def test_a_run_without_its_tokenizer_is_refused(tmp_path, run, capsys):
    """Before: a tokenizer was trained anew from the data, and the checkpoint was refused for a shape."""
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("eval", "tokenizer"))
    assert evaluate.main([str(copy)]) == 2
    assert one_error_line(capsys, "error:") == f"error: {copy / 'tokenizer'}: missing (the run's tokenizer)"


@pytest.mark.slow
def test_a_run_saved_before_newer_keys_still_evaluates(run, tmp_path):
    older = tmp_path / "older"
    shutil.copytree(run, older, ignore=shutil.ignore_patterns("eval"))
    saved = OmegaConf.load(older / "config.yaml")
    del saved["eval"]  # keys the schema gained after the run was saved
    del saved.data["timeline"]
    OmegaConf.save(saved, older / "config.yaml")
    assert evaluate.main([str(older), "--ckpt", "last", "--name", "old"]) == 0
    assert eval_metrics(older, "old")["eval/protocol"] == "exact"


@pytest.fixture
def config_only(tmp_path) -> Path:
    """A run folder holding only its config.yaml."""
    OmegaConf.save(load_config(["experiment=tiny", f"output_dir={tmp_path}"]), tmp_path / "config.yaml")
    return tmp_path


def one_error_line(capsys, prefix: str) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), lines
    return lines[0]


def test_a_folder_without_config_is_an_error(tmp_path, capsys):
    assert evaluate.main([str(tmp_path)]) == 2
    assert str(tmp_path / "config.yaml") in one_error_line(capsys, "error:")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("ckpt", ["best", "last", "elsewhere.ckpt"])
def test_a_missing_checkpoint_is_an_error(config_only, capsys, ckpt):
    assert evaluate.main([str(config_only), "--ckpt", ckpt]) == 2
    line = one_error_line(capsys, "error:")
    assert ("elsewhere.ckpt" if ckpt == "elsewhere.ckpt" else str(config_only / "checkpoints")) in line
    assert sorted(p.name for p in config_only.iterdir()) == ["config.yaml"]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.refine.steps=-1", "model.refine.steps"),
        ("data.batch_size=0", "data.batch_size"),
        ("+model.refine.stepz=3", "model.refine.stepz"),
        ("trainer.max_steps=abc", "trainer.max_steps"),
        ("model=direct", "model"),
    ],
)
def test_bad_overrides_are_config_errors(config_only, capsys, override, key):
    assert evaluate.main([str(config_only), override]) == 2
    assert key in one_error_line(capsys, "config error:")
    assert sorted(p.name for p in config_only.iterdir()) == ["config.yaml"]


@pytest.mark.parametrize("override", ["data=builtin", "+data=builtin", "experiment=tiny", "model@x=direct"])
def test_a_config_group_is_refused_with_advice_that_works(config_only, capsys, override):
    """Before: Hydra's 'To append to your default list use +data=builtin', which is refused in turn."""
    assert evaluate.main([str(config_only), override]) == 2
    line = one_error_line(capsys, f"config error: {override}: ")
    assert "keys, not config groups" in line and "use +" not in line


def test_a_saved_config_with_keys_nothing_reads_is_refused(config_only, capsys):
    saved = OmegaConf.load(config_only / "config.yaml")
    OmegaConf.set_struct(saved, False)
    saved.model.refine.stepz = 3  # a typo: nothing reads it
    saved.extra = {"note": "x"}
    OmegaConf.save(saved, config_only / "config.yaml")
    assert evaluate.main([str(config_only)]) == 2
    line = one_error_line(capsys, "config error:")
    assert str(config_only / "config.yaml") in line and "extra, model.refine.stepz: not config keys" in line


def test_a_saved_config_keeps_keys_their_readers_take(config_only, capsys):
    """A Trainer argument added with +, early stopping's and FSDP's options are read: the run goes
    on to look for its checkpoint."""
    saved = OmegaConf.load(config_only / "config.yaml")
    OmegaConf.set_struct(saved, False)
    saved.trainer.accumulate_grad_batches = 2
    saved.callbacks.early_stopping = {"monitor": "val/mIoU", "mode": "max", "patience": 3}
    saved.trainer.strategy = {"name": "fsdp", "auto_wrap": "decoder_layers", "cpu_offload": False}
    OmegaConf.save(saved, config_only / "config.yaml")
    assert evaluate.main([str(config_only)]) == 2
    assert str(config_only / "checkpoints") in one_error_line(capsys, "error:")


def test_a_run_saved_with_early_stopping_without_mode_reads_as_it_ran(tmp_path):
    """train.py now requires callbacks.early_stopping.mode (EarlyStopping's default, min, is the wrong
    way for val/mIoU); a run saved without it ran with min and still loads, so."""
    saved = load_config(["data=builtin", f"output_dir={tmp_path}"])
    saved.callbacks.early_stopping = {"monitor": "val/mIoU", "patience": 3}
    OmegaConf.save(saved, tmp_path / "config.yaml")
    loaded = load_run_config(tmp_path, [])
    assert loaded.callbacks.early_stopping == {"monitor": "val/mIoU", "patience": 3, "mode": "min"}
    with pytest.raises(ConfigError, match="EarlyStopping's default, min, stops a run whose score rises"):
        load_config(["callbacks.early_stopping={monitor: val/mIoU, patience: 3}"])
    older = OmegaConf.to_container(saved)
    del older["model"]["saliency"]  # a run saved before model.saliency was: no projector steps
    OmegaConf.save(OmegaConf.create(older), tmp_path / "config.yaml")
    assert load_run_config(tmp_path, []).model.saliency.projector_steps == 0


@pytest.mark.parametrize(
    "overrides",
    [
        ["data.timeline=vtimellm100"],
        ["model.refine.steps=1"],
        ["model.answer_tokens=canonical", "data.source.num_frames=8"],
        ["model.lm.tiny.hidden_size=64"],
        ["data.prompt_template=reference"],
    ],
)
def test_overriding_what_the_run_was_trained_as_is_refused(config_only, capsys, overrides):
    assert evaluate.main([str(config_only), *overrides]) == 2
    line = one_error_line(capsys, "config error:")
    assert ", ".join(sorted(o.split("=")[0] for o in overrides)) in line and "trained" in line
    assert sorted(p.name for p in config_only.iterdir()) == ["config.yaml"]


@pytest.mark.parametrize(
    "overrides",
    [
        ["trainer.max_steps=5"],
        ["grpo.num_iterations=2", "callbacks.checkpoint.save_top_k=3"],
        ["init_from_run=null", "test=false"],
        ["grpo.enabled=true"],  # before: "grpo.enabled=true needs init_from_run=...", then refused
    ],
)
def test_training_settings_are_refused_as_changing_nothing(config_only, capsys, overrides):
    """Before: accepted, changing nothing (init_from_run: rebuilt from another run, another model)."""
    assert evaluate.main([str(config_only), *overrides]) == 2
    line = one_error_line(capsys, "config error:")
    changed = [o.split("=")[0] for o in overrides if o != "init_from_run=null"]  # the run's own value
    assert line.startswith(
        f"config error: {', '.join(sorted(changed))}: training settings, which an evaluation"
    )


def test_an_evaluation_of_no_batch_is_refused_without_advice_it_refuses(config_only, capsys):
    """Before: "set test=false to skip the test", which evaluate.py refuses as a training setting."""
    assert evaluate.main([str(config_only), "trainer.limit_test_batches=0"]) == 2
    line = one_error_line(capsys, "config error: trainer.limit_test_batches=0 tests nothing")
    assert "set test=false" not in line


@pytest.mark.parametrize(
    "override",
    [
        "eval.protocol=vtimellm",
        "data.eval_batch_size=4",
        "trainer.limit_test_batches=1",
        "trainer.precision=32-true",
        "model.inference.final=aux",
        "data.timeline=uniform99",  # the run's own value
        "data.source.num_test=4",
    ],
)
def test_evaluation_settings_stay_overridable(config_only, capsys, override):
    assert evaluate.main([str(config_only), override]) == 2  # no checkpoint: past the config checks
    assert str(config_only / "checkpoints") in one_error_line(capsys, "error:")


@pytest.mark.parametrize(
    "choices",
    [
        ["data=builtin", "trainer=fsdp"],  # trainer.strategy: a mapping where the default holds "auto"
        ["data=charades_sta", "trainer=ddp"],
        ["data=activitynet", "trainer=gpu"],
        [
            "data=jsonl",
            "callbacks.early_stopping={monitor: val/mIoU, mode: max}",
            "+trainer.accumulate_grad_batches=2",
        ],
        ["data=qvhighlights", "experiment=timerefine_onpolicy"],  # Lighthouse keys, annotation_files
    ],
)
def test_every_config_train_saves_reads_back(tmp_path, choices):
    """No key of a config train.py composes counts as one nothing reads."""
    saved = load_config([*choices, f"output_dir={tmp_path}"])
    OmegaConf.save(saved, tmp_path / "config.yaml")
    assert load_run_config(tmp_path, []) == saved


@pytest.mark.parametrize("name", ["../../escape", "", "..", "a/b"])
def test_the_output_name_stays_inside_the_runs_eval_folder(config_only, capsys, name):
    """Before: --name ../../escape wrote outside the run, --name "" into eval/ itself."""
    with pytest.raises(SystemExit) as exit_:
        evaluate.main([str(config_only), "--name", name])
    assert exit_.value.code == 2 and "must be one folder's name inside <run>/eval" in capsys.readouterr().err
    assert sorted(p.name for p in config_only.iterdir()) == ["config.yaml"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "edit",
    [("data", "timeline", "vtimellm100"), ("model.refine", "steps", 1), ("model.lm.tiny", "num_layers", 2)],
)
def test_a_config_edited_against_its_checkpoint_is_refused(run, tmp_path, capsys, edit):
    """Before: a config.yaml edited by hand decoded the checkpoint as another model (another timeline,
    another K), exit 0 with other scores; one whose model has other shapes (a truncated config.yaml
    too) was blamed on the checkpoint ("it lacks model.lm.model.layers.1...")."""
    edited = tmp_path / "edited"
    shutil.copytree(run, edited, ignore=shutil.ignore_patterns("eval"))
    saved = OmegaConf.load(edited / "config.yaml")
    node, key, value = edit
    OmegaConf.select(saved, node)[key] = value
    OmegaConf.save(saved, edited / "config.yaml")
    capsys.readouterr()
    assert evaluate.main([str(edited), "--ckpt", "last"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "trained otherwise than the run's config.yaml says" in error
    assert f"{node}.{key}" in error and not (edited / "eval").exists()
    with pytest.raises(InputError, match=rf"trained otherwise than the run's config.yaml says.*{node}.{key}"):
        load_run(edited, "last")  # predict and the Grounder API, the same check


def test_a_corrupt_saved_config_is_named_once(tmp_path, capsys):
    """Before: 'config error: <run>/config.yaml: <run>/config.yaml: not a run's config ...'."""
    config = tmp_path / "config.yaml"
    config.write_text("{{{ x\n")
    assert evaluate.main([str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"config error: {config}: not a run's config") and error.count(f"{config}:") == 1
