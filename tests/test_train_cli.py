"""train.py's command line: a bad setting is one line before anything is written, and --cfg job /
--help print the composed config and run nothing."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from grounding.metrics.prior import prior_scores
from grounding.records import GroundingRecord
from timerefine.pipeline.batch_limits import empty_loops
from timerefine.pipeline.build import build_datamodule
from timerefine.pipeline.config import load_config
from timerefine.pipeline.selection import chosen_on_test
from timerefine.train import folder_override

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def train_main():
    import train

    return train.main


CLI_ERRORS = [
    ("model.refine.steps=-1", "model.refine.steps"),
    ("model.refine.steps=null", "model.refine.steps"),
    ("model.refine.noise_std=[]", "model.refine.noise_std"),
    ("data.batch_size=0", "data.batch_size"),
    ("+trainer.foo=1", "trainer.foo"),
    ("+model.refine.stepz=3", "model.refine.stepz"),
    ("callbacks.early_stopping=5", "callbacks.early_stopping=5: must be null or a mapping"),  # AttributeError
    ("+callbacks.early_stopping.patience=1", "callbacks.early_stopping="),  # TypeError: no monitor
    # Lightning's default mode=min stopped a run whose val/mIoU rose
    ("callbacks.early_stopping={monitor:val/mIoU,patience:2}", "callbacks.early_stopping="),
    ("trainer.val_check_interval=0", "trainer.val_check_interval=0: must be"),  # ZeroDivisionError in fit
    # counted batches where an int counts optimizer steps (data.global_batch_size, GRPO)
    ("trainer.val_check_interval=4.0", "trainer.val_check_interval=4.0: must be"),
    ("trainer.max_steps=-1", "trainer.max_steps=-1 (no step limit) needs max_epochs"),  # OverflowError
    # Hydra advised --multirun, which train.py refused as a parse error
    ("seed=1,2", "seed=1,2: a sweep, and a run takes one value (a list is key=[a,b]; text with a comma"),
    ("--multirun", "--multirun: train.py runs one config; sweeps run through timerefine-ablate"),
    # before: Hydra's "missing EQUAL" for "all", and Lightning's refusal only when the run started
    ("--cfg all", "--cfg: train.py prints the job's config only: --cfg job"),
    (
        "trainer.val_check_interval=0.5",
        "trainer.val_check_interval=0.5 is a fraction of an epoch, which needs",
    ),
]


@pytest.mark.parametrize(("override", "key"), CLI_ERRORS)
def test_train_py_refuses_bad_settings_before_writing(train_main, tmp_path, capsys, override, key):
    output_dir = tmp_path / "run"
    assert (
        train_main(
            ["experiment=tiny", "trainer.accelerator=cpu", f"output_dir={output_dir}", *override.split()]
        )
        == 2
    )
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"config error: {key}"), lines
    assert not output_dir.exists()


@pytest.mark.parametrize(
    "override",
    [
        "trainer.devices=0",
        "trainer.strategy=foo",
        pytest.param(
            "trainer.accelerator=gpu",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here, so gpu is valid"),
        ),
    ],
)
def test_trainer_settings_lightning_refuses_are_one_line(train_main, tmp_path, capsys, override):
    """Before: Lightning's MisconfigurationException or ValueError as a traceback, exit 1."""
    output_dir = tmp_path / "run"
    assert train_main(["experiment=tiny", f"output_dir={output_dir}", override]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: trainer (accelerator, devices, strategy"), lines
    assert not output_dir.exists()


@pytest.mark.parametrize(
    ("override", "loop"),
    [("trainer.limit_val_batches=0.0001", "val"), ("trainer.limit_test_batches=0.01", "test")],
)
def test_a_batch_fraction_under_one_batch_is_refused_before_anything_is_written(
    train_main, tmp_path, capsys, override, loop
):
    """Before: Lightning's MisconfigurationException as a traceback when the loop started, after
    config.yaml and the tokenizer were written."""
    output_dir = tmp_path / "run"
    assert train_main(["experiment=tiny", f"output_dir={output_dir}", override]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: trainer.limit_{loop}_batches="), lines
    assert "of the 1 " + loop + " batches per process is none" in lines[0]
    assert not output_dir.exists()


def test_an_output_dir_below_a_file_is_a_config_error(train_main, tmp_path, capsys):
    """Before: NotADirectoryError as a traceback after the model was built."""
    (tmp_path / "notes.txt").write_text("x")
    output_dir = tmp_path / "notes.txt" / "run"
    assert train_main(["experiment=tiny", f"output_dir={output_dir}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    reason = f"{tmp_path / 'notes.txt'} is a file, so no directory can be made below it"
    assert lines == [f"config error: output_dir={output_dir}: {reason}"], lines


def test_an_output_dir_on_a_read_only_file_system_is_one_line(train_main, read_only_folder, capsys):
    """Before: OSError (read-only file system) as a traceback after the model was built (found by a
    SLURM review: a job's run folder on a read-only mount)."""
    output_dir = read_only_folder / "run"
    assert train_main(["experiment=tiny", f"output_dir={output_dir}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    reason = f"{read_only_folder} is not writable here (no write access, or a read-only file system)"
    assert lines == [f"error: output_dir={output_dir}: {reason}"], lines


def test_a_read_only_output_dir_is_refused_only_where_a_run_would_write_in_it(
    train_main, read_only_folder, capsys
):
    """Review: as a config rule, the check refused --cfg job, a finished run re-run (nothing to do) and
    the saved config of a run copied from a machine whose folders are not writable here."""
    output_dir = read_only_folder / "run"
    assert train_main(["--cfg", "job", "experiment=tiny", f"output_dir={output_dir}"]) == 0
    assert f"output_dir: {output_dir}" in capsys.readouterr().out


def test_no_test_batches_is_asked_for_with_test_false(train_main, tmp_path):
    output_dir = tmp_path / "run"
    assert (
        train_main(
            ["experiment=tiny", f"output_dir={output_dir}", "trainer.limit_test_batches=0", "test=false"]
        )
        == 0
    )
    assert not any(key.startswith("test/") for key in json.loads((output_dir / "metrics.json").read_text()))


@pytest.mark.parametrize("flags", [["--cfg", "job"], ["--help"]])
def test_train_py_prints_the_composed_config_and_runs_nothing(train_main, tmp_path, capsys, flags):
    overrides = ["model=direct", "trainer.max_steps=700", f"output_dir={tmp_path / 'run'}"]
    assert train_main([*flags, *overrides]) == 0
    out = capsys.readouterr().out
    if "--help" in flags:
        assert "Config groups" in out and "  data: activitynet, builtin, charades_sta, didemo" in out
        out = out.split("The composed config (key=value sets a key):\n")[1]
    assert OmegaConf.create(out) == load_config(overrides)  # every key, with its default or override
    assert not (tmp_path / "run").exists()


def test_job_is_a_flag_only_after_cfg(train_main, tmp_path, capsys):
    """Before: a bare ``job`` anywhere printed the config and trained nothing, exit 0."""
    assert train_main(["job", "experiment=tiny", f"output_dir={tmp_path / 'run'}"]) == 2
    out, err = capsys.readouterr()
    assert not out and err.startswith("config error: ") and "'job'" in err and len(err.splitlines()) == 1


def test_train_py_refuses_an_output_dir_that_is_a_file(train_main, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("keep me\n")
    assert train_main(["experiment=tiny", f"output_dir={taken}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: output_dir") and str(taken) in lines[0]
    assert taken.read_text() == "keep me\n" and sorted(tmp_path.iterdir()) == [taken]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("callbacks.checkpoint.monitor=val/foo", "callbacks.checkpoint.monitor"),
        (
            "callbacks.early_stopping={monitor: val/mIoUx, mode: max, patience: 1}",
            "callbacks.early_stopping.monitor",
        ),
        ("callbacks.checkpoint.monitor=mIoU", "callbacks.checkpoint.monitor"),  # before: a traceback too
        ("callbacks.early_stopping={monitor: mIoU, mode: max}", "callbacks.early_stopping.monitor"),
    ],
)
def test_a_monitored_metric_nothing_logs_is_refused_before_training(
    train_main, tmp_path, capsys, override, key
):
    """Before: a traceback at the first validation, after training had started, exit 1."""
    output_dir = tmp_path / "run"
    assert train_main(["experiment=tiny", f"output_dir={output_dir}", override]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}="), lines
    assert "val/mIoU" in lines[0] and "val/step4/mIoU" in lines[0]
    assert not output_dir.exists()


def test_every_monitorable_metric_is_logged(train_main, tmp_path):
    """The keys a monitor may name are the ones a validation logs (aux choices and steps included)."""
    from timerefine.pipeline.build import build_datamodule, build_module

    output_dir = tmp_path / "run"
    assert train_main(["experiment=tiny", f"output_dir={output_dir}", "logger.tensorboard=false"]) == 0
    header = (output_dir / "logs" / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    cfg = load_config(["experiment=tiny"])
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    keys = build_module(cfg, datamodule).evaluation_keys("val")
    assert sorted(k for k in header if k.startswith("val/")) == sorted(keys)


def test_an_output_dir_one_may_not_write_in_is_one_line(train_main, unwritable_folder, capsys):
    """Before: a PermissionError traceback."""
    assert train_main(["experiment=tiny", f"output_dir={unwritable_folder / 'run'}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(unwritable_folder) in lines[0], lines


def test_the_prior_is_scored_on_the_queries_a_limited_test_scored(train_main, tmp_path):
    """Before: the summary set the model's mIoU on the tested queries against the prior's on all of
    them (Charades with limit_test_batches=2: 18.51 vs 30.51 at 5 % coverage)."""
    output_dir = tmp_path / "run"
    overrides = ["experiment=tiny", f"output_dir={output_dir}", "trainer.max_steps=2"]
    overrides += ["trainer.limit_test_batches=1", "data.eval_batch_size=2", "logger.tensorboard=false"]
    assert train_main(overrides) == 0
    metrics = json.loads((output_dir / "metrics.json").read_text())
    rows = (output_dir / "predictions" / "test.jsonl").read_text().splitlines()
    datamodule = build_datamodule(load_config(overrides))
    train, test = datamodule.records("train"), datamodule.records("test")
    tested = [record for record in test if record.qid in {json.loads(row)["qid"] for row in rows}]
    assert len(tested) == metrics["test/queries"] == 2 < len(test)
    assert metrics["prior/mIoU"] == pytest.approx(prior_scores(train, tested)["mIoU"], rel=1e-6)
    assert metrics["prior/mIoU"] != pytest.approx(prior_scores(train, test)["mIoU"], rel=1e-6)


@pytest.mark.parametrize(("global_batch", "warned"), [(12, True), (8, False)])
def test_an_epoch_ending_on_a_partial_accumulation_is_warned_of(
    train_main, tmp_path, caplog, global_batch, warned
):
    """Before: 8 batches an epoch at 3 a step stepped on 2 at each epoch's end, and the validation of
    step 4 (val_check_interval=2) never came, without a word."""
    overrides = ["experiment=tiny", f"output_dir={tmp_path / 'run'}", "trainer.max_steps=2"]
    overrides += [
        "data.source.num_train=32",
        f"data.global_batch_size={global_batch}",
        "logger.tensorboard=false",
    ]
    assert train_main(overrides) == 0
    warning = "an epoch is 8 batches per process, 2 past a multiple of the 3 a step accumulates"
    assert (warning in caplog.text) is warned


class SplitRecords:
    """A datamodule's ``records`` by split."""

    def __init__(self, **splits: list[GroundingRecord]) -> None:
        self.splits = splits

    def records(self, split: str) -> list[GroundingRecord]:
        return self.splits[split]


def test_a_checkpoint_chosen_on_test_queries_is_warned_of():
    """Before: data=charades_sta (val: test) chose the best checkpoint by val/mIoU on test queries and
    tested it on them, without a word (found by a hunt)."""
    query = GroundingRecord("charades:test:000001", "V1", "a person opens a door", 30.0, 2.0, 8.0)
    other = GroundingRecord("charades:test:000002", "V2", "a person sits down", 30.0, 1.0, 5.0)
    same, apart = SplitRecords(val=[query, other], test=[query]), SplitRecords(val=[other], test=[query])
    cfg = load_config(["data=charades_sta"])
    warning = chosen_on_test(cfg, same)
    assert warning.startswith("1 validation queries are test queries (data.source.splits.val: test)"), warning
    assert "callbacks.checkpoint.monitor=val/mIoU chooses the tested checkpoint" in warning
    assert chosen_on_test(cfg, apart) is None
    assert (
        chosen_on_test(load_config(["data=charades_sta", "callbacks.checkpoint.monitor=null"]), same) is None
    )
    assert chosen_on_test(load_config(["data=charades_sta", "test=false"]), same) is None
    assert chosen_on_test(load_config(["data=charades_sta", "trainer.max_steps=0"]), same) is None  # no fit


def test_a_train_split_smaller_than_the_process_count_is_one_line():
    """Even training shards (datamodules/sampling.py) leave a process of a smaller split no batch."""
    trainer = L.Trainer(
        accelerator="cpu", devices=3, strategy="ddp", logger=False, enable_checkpointing=False
    )
    records = [GroundingRecord(f"q{i}", "V", "a person opens a door", 30.0, 2.0, 8.0) for i in range(2)]
    datamodule = SplitRecords(train=records)
    assert list(empty_loops(trainer, datamodule, ("train",))) == [
        "the train split's 2 queries leave some of the 3 processes none"
    ]


@pytest.mark.parametrize(
    "folder", ["runs/2026-12-07_00-01-02", "abl/K[model.refine.steps=1]/seed0", "a b,c/it's"]
)
def test_the_folder_a_stopped_run_names_reaches_hydra_as_it_is(folder):
    """Review: printed bare, an ablation's K[model.refine.steps=1] folder was an override Hydra refused."""
    (given,) = shlex.split(folder_override(folder))  # as a shell passes it
    assert load_config([given]).output_dir == folder


def test_the_examples_of_help_run(train_main, capsys):
    """Review: `python train.py --help` showed model=direct trainer.max_steps=200, which every run refused
    (600 projector steps come first)."""
    import timerefine.train

    examples = [
        line.split("#")[0] for line in timerefine.train.__doc__.splitlines() if "python train.py " in line
    ]
    assert examples
    for example in examples:
        overrides = [word for word in shlex.split(example)[2:] if word not in ("--cfg", "job", "[overrides]")]
        assert train_main(["--cfg", "job", *overrides]) == 0, capsys.readouterr().err


@pytest.mark.slow
def test_a_run_prints_none_of_lightnings_notes_a_user_cannot_act_on(tmp_path):
    """New-user review: every run printed a deprecation inside Lightning, a note on the module's batch
    transfer and an advert for a cloud logger."""
    run = [sys.executable, "train.py", "experiment=tiny", "trainer.max_steps=2", f"output_dir={tmp_path}"]
    done = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for note in ("LeafSpec", "transfer_batch_to_device", "litlogger"):
        assert note not in done.stdout + done.stderr, note
