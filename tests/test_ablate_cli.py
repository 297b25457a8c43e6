"""timerefine-ablate: variant names and overrides as a user writes them, runs where the user asked,
and a failed run that the exit code reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from timerefine.pipeline.ablation import HEADLINE
from timerefine.pipeline.config import load_config
from timerefine.pipeline.init_from_run import train_config
from timerefine.tools import ablate
from timerefine.tools.ablate import variants

TINY = ["experiment=tiny", "trainer.max_steps=2", "trainer.val_check_interval=2", "logger.tensorboard=false"]


def no_run(command: list[str]) -> int:
    pytest.fail(f"ran {command}")


def test_a_quoted_value_with_spaces_stays_one_override():
    """Before: split on whitespace, so the template reached Hydra in pieces."""
    found = variants(['p=data.prompt_template="<video> When does {query} happen?" model=direct'])
    assert found == {"p": ["data.prompt_template=<video> When does {query} happen?", "model=direct"]}


def test_a_comma_list_expands_into_named_variants():
    assert variants(["k=model.refine.steps=0,1 model.aux.weight=2"]) == {
        "k[model.refine.steps=0]": ["model.refine.steps=0", "model.aux.weight=2"],
        "k[model.refine.steps=1]": ["model.refine.steps=1", "model.aux.weight=2"],
    }


def test_a_comma_list_of_paths_gives_one_folder_per_variant():
    """Before: ``P[data.source.root=../../x]`` was a folder nested in others, or outside ``--out``."""
    found = variants(["P=data.source.root=../../x,a/b"])
    assert list(found) == ["P[data.source.root=..%2F..%2Fx]", "P[data.source.root=a%2Fb]"]
    assert found["P[data.source.root=a%2Fb]"] == ["data.source.root=a/b"]


def test_a_comma_list_variant_gets_its_own_folder():
    """docs/ablations.md's ``K="model.refine.steps=1,2,3"``: the folder ``K[model.refine.steps=1]``
    reached Hydra unquoted, and every run of it was a config error."""
    for label, overrides in variants(["K=model.refine.steps=1,2", "it's=model=direct"]).items():
        run_dir = Path("abl") / label / "seed3"
        cfg = load_config(ablate.run_overrides(TINY, overrides, 3, run_dir))
        assert cfg.output_dir == str(run_dir) and cfg.seed == 3


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        (["good=model.refine.steps=1", "good=model.refine.steps=2"], "given twice"),  # the first never ran
        (["a/b=model.refine.steps=0"], "no '/'"),  # ran, but its folder was not a variant's
        (["=model.refine.steps=0"], "needs NAME="),
        (["results.md=model=direct"], "a report's file name"),  # trained, then an IsADirectoryError
    ],
)
def test_names_that_would_lose_a_variant_are_refused(capsys, tmp_path, specs, message):
    argv = ["--out", str(tmp_path / "unused"), *[f"--variant={spec}" for spec in specs], "--", *TINY]
    assert ablate.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --variant") and message in lines[0], lines


@pytest.mark.slow
def test_runs_go_where_the_caller_points_and_a_failure_is_the_exit_code(tmp_path, monkeypatch, capsys):
    """Before: a relative --out went below the package's folder, and a failed run exited 0."""
    monkeypatch.chdir(tmp_path)
    argv = [
        "--out",
        "abl",
        "--variant",
        "good=model.refine.steps=1",
        "--variant",
        "bad=trainer.devices=0",  # Lightning's refusal, when the run starts
    ]
    assert ablate.main([*argv, "--", *TINY]) == 1
    assert (tmp_path / "abl" / "good" / "seed0" / "metrics.json").is_file()
    report = (tmp_path / "abl" / "results.md").read_text()
    assert (
        "| good | 1 |" in report and "Left out: abl/bad/seed0: its run failed." in report
    )  # before: no word
    assert "error: 1 run(s) failed: abl/bad/seed0" in capsys.readouterr().err


@pytest.mark.slow
def test_a_redefined_variant_is_not_reported_with_its_old_scores(tmp_path, monkeypatch, capfd):
    """Before: a finished run was skipped by its folder name alone, so ``K`` redefined from K=1 to
    K=2 (or trained longer) reported the K=1 scores under the new definition, exit 0."""
    monkeypatch.chdir(tmp_path)
    run = ["--out", "abl", "--variant"]
    assert ablate.main([*run, "K=model.refine.steps=1", "--", *TINY]) == 0
    capfd.readouterr()
    assert ablate.main([*run, "K=model.refine.steps=1", "--", *TINY, "callbacks.progress_bar=none"]) == 0
    assert "[skip] abl/K/seed0 is finished with these settings" in capfd.readouterr().out
    assert ablate.main([*run, "K=model.refine.steps=2", "--", *TINY]) == 1
    err = capfd.readouterr().err
    assert "model.refine.steps: 1 -> 2" in err and "error: 1 run(s) failed: abl/K/seed0" in err
    assert "no finished runs under abl" in err  # the K=1 scores are not reported as K=2's
    longer = [
        "experiment=tiny",
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
        "logger.tensorboard=false",
    ]
    assert ablate.main([*run, "K=model.refine.steps=1", "--", *longer]) == 0  # continued, as train.py does
    assert json.loads((tmp_path / "abl" / "K" / "seed0" / "metrics.json").read_text())["global_step"] == 4


def test_a_seed_given_twice_is_refused(capsys):
    assert ablate.main(["--out", "abl", "--seeds", "0", "0", "--variant", "a=model=direct"]) == 2
    assert "--seeds: 0 given twice" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--variant", "s5=seed=5"], "--variant s5: seed=5 is set by the tool for each run; use --seeds"),
        (["--variant", "a=seed=1,2"], "--variant a: seed=1,2 is set by the tool for each run; use --seeds"),
        (
            ["--variant", "o=+output_dir=x"],
            "--variant o: +output_dir=x is set by the tool for each run; use --out",
        ),
        (["--variant", "a=model=direct", "--", "seed=3"], "after --: seed=3 is set by the tool for each run"),
        (["--variant", "a=model=direct", "--", "output_dir=x"], "after --: output_dir=x is set by the tool"),
    ],
)
def test_a_seed_or_folder_the_tool_would_replace_is_refused(monkeypatch, capsys, argv, message):
    """Before: ``seed=`` and ``output_dir=`` were appended after them, so ``s5="seed=5"`` ran seed 0
    into s5/seed0 and ``a="seed=1,2"`` ran twice the same."""
    monkeypatch.setattr(ablate, "run_train", no_run)
    assert ablate.main(["--out", "abl", *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), lines


def finished_run(out: Path, name: str, overrides: list[str], seed: int, miou: float, shared=TINY) -> None:
    """A run folder as train.py leaves a finished run: its config and its metrics."""
    run_dir = out / name / f"seed{seed}"
    run_dir.mkdir(parents=True)
    given = ablate.run_overrides(shared, overrides, seed, run_dir)
    cfg = train_config(given)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (run_dir / "metrics.json").write_text(json.dumps(dict.fromkeys(HEADLINE, miou) | {"test/queries": 8}))


def test_the_report_holds_the_variants_and_seeds_given(tmp_path, monkeypatch, capsys):
    """Before: every */seed*/metrics.json under --out was reported, so ``A`` redefined from K=3 to
    direct for seed 1 was the mean of a K=3 and a direct run, and ``--seeds 1`` reported seed 0 too."""
    monkeypatch.setattr(ablate, "run_train", no_run)  # every run given is finished
    finished_run(tmp_path, "A", ["model.refine.steps=3"], 0, 10.0)
    finished_run(tmp_path, "A", ["model=direct"], 1, 2.0)
    finished_run(tmp_path, "B", ["model=direct"], 0, 5.0)
    given = ["--out", str(tmp_path), "--variant", "A=model=direct"]
    assert ablate.main([*given, "--seeds", "1", "--", *TINY]) == 0
    captured = capsys.readouterr()
    assert "| A | 1 | 8 | 2.00 | 2.00 | 2.00 | 2.00 |" in captured.out and "| B |" not in captured.out
    assert captured.err == ""
    assert ablate.main([*given, "--seeds", "0", "1", "--report-only", "--", *TINY]) == 0
    captured = capsys.readouterr()
    assert "| A | 1 | 8 | 2.00 |" in captured.out
    assert captured.err == f"[left out] {tmp_path / 'A' / 'seed0'}: no run finished with these settings\n"
    left_out = f"Left out: {tmp_path / 'A' / 'seed0'}: no run finished with these settings."
    assert left_out in (tmp_path / "results.md").read_text().splitlines()  # before, on stderr alone


def test_runs_started_from_another_run_are_reported(tmp_path, monkeypatch, capsys):
    """Before: their config (the source run's model settings inherited, as train.py saves it) never
    matched the command's, so a GRPO or stage ablation was all '[left out]'."""
    monkeypatch.setattr(ablate, "run_train", no_run)
    source = tmp_path / "source"
    (source / "checkpoints").mkdir(parents=True)
    wider = load_config([*TINY, "model.lm.tiny.hidden_size=48", f"output_dir={source}"])
    (source / "config.yaml").write_text(OmegaConf.to_yaml(wider))
    shared = [*TINY, f"init_from_run={source}"]
    finished_run(tmp_path / "abl", "A", ["model.optim.lr=1e-4"], 0, 7.0, shared)
    argv = ["--out", str(tmp_path / "abl"), "--variant", "A=model.optim.lr=1e-4", "--report-only"]
    assert ablate.main([*argv, "--", *shared]) == 0
    captured = capsys.readouterr()
    assert "| A | 1 | 8 | 7.00 |" in captured.out and captured.err == ""


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        ("A=model.refine.stepz=1", "--variant A: model.refine.stepz: Key 'stepz' not in"),
        ("A=model.refine.steps=abc", "--variant A: model.refine.steps: Value 'abc'"),
        ("A=model.refine.steps=-1", "--variant A: model.refine.steps=-1: must be"),
        ("A=model=direct data.batch_size=0", "--variant A: data.batch_size=0: must be"),
        # before (review): the last value silently won, and K[model.refine.steps=1] ran steps=0
        ("K=model.refine.steps=1,2 model.refine.steps=0", "--variant K: model.refine.steps given twice"),
        ("A=model.refine.steps=1 +model.refine.steps=2", "--variant A: model.refine.steps given twice"),
        ("A=model.refine.steps='1", "--variant A: No closing quotation in"),
    ],
)
@pytest.mark.parametrize("report_only", [[], ["--report-only"]])
def test_a_grid_point_that_does_not_load_is_refused_before_any_run(
    monkeypatch, capsys, variant, message, report_only
):
    """Before (review): train.py refused each of its runs in turn, exit 1; --report-only said
    '[left out] ...: no run finished with these settings', naming no key."""
    monkeypatch.setattr(ablate, "run_train", no_run)
    argv = ["--out", "abl", "--seeds", "0", "1", "--variant", variant, "--variant", "ok=model=direct"]
    assert ablate.main([*argv, *report_only, "--", *TINY]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), lines


def test_training_rules_judge_the_runs_the_grid_would_train(monkeypatch, capsys, tmp_path):
    """Before: accepted, and every seed's train.py refused it one by one. Review: judged against seed0's
    folder whatever --seeds said, and for --report-only, which trains nothing."""
    recorded = []
    monkeypatch.setattr(ablate, "run_train", lambda command: recorded.append(command) or 1)
    monitor = "callbacks.checkpoint.monitor=val/loss"
    argv = ["--out", str(tmp_path), "--seeds", "1", "--variant", f"A={monitor}"]
    assert ablate.main([*argv, "--", *TINY]) == 2
    assert capsys.readouterr().err.startswith(
        f"error: --variant A: {monitor} with callbacks.checkpoint.mode=max"
    )
    assert ablate.main([*argv, "--report-only", "--", *TINY]) == 1 and not recorded  # no run finished
    begun = tmp_path / "A" / "seed1"  # a run begun so before the rule continues as it began
    begun.mkdir(parents=True)
    OmegaConf.save(load_config([*TINY, monitor, "seed=1", f"output_dir={begun}"]), begun / "config.yaml")
    assert ablate.main([*argv, "--", *TINY]) == 1 and len(recorded) == 1  # its train.py ran (and failed)


@pytest.mark.parametrize(
    ("shared", "message"),
    [  # before: "--variant direct: trainer.foo: ...", and Hydra's lexer message for --report-only
        (["trainer.foo=1"], "after --: trainer.foo: Key 'foo' not in 'TrainerConfig'"),
        (["--report-only"], "after --: --report-only: the tool's options go before --; after it, overrides"),
    ],
)
def test_a_mistake_after_the_dashes_is_not_blamed_on_a_variant(monkeypatch, capsys, shared, message):
    monkeypatch.setattr(ablate, "run_train", no_run)
    argv = ["--out", "abl", "--variant", "direct=model=direct", "--variant", "K1=model.refine.steps=1"]
    assert ablate.main([*argv, "--", *TINY, *shared]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), lines


def test_a_key_given_twice_after_the_separator_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(ablate, "run_train", no_run)
    assert (
        ablate.main(["--out", "abl", "--variant", "a=model=direct", "--", *TINY, "trainer.max_steps=3"]) == 2
    )
    assert capsys.readouterr().err == "error: after --: trainer.max_steps given twice; give each key once\n"


def test_variants_with_the_same_settings_are_noted(tmp_path, capsys):
    finished_run(tmp_path, "A", ["model=direct"], 0, 2.0)
    finished_run(tmp_path, "B", ["model=direct"], 0, 2.0)
    argv = ["--out", str(tmp_path), "--variant", "A=model=direct", "--variant", "B=model=direct"]
    assert ablate.main([*argv, "--report-only", "--", *TINY]) == 0
    assert capsys.readouterr().err == "note: --variant B runs the same settings as A\n"


def test_a_run_without_test_scores_is_left_out_and_not_counted(tmp_path, capsys):
    """Before (review): a seed finished with test=false counted in 'seeds' (3) while the mean was over
    the 2 tested ones, and its missing baseline dropped the prior row; all untested: a row of nan, exit 0."""
    for seed in (0, 1):
        finished_run(tmp_path, "A", ["model=direct"], seed, 2.0)
    finished_run(tmp_path, "A", ["model=direct"], 2, 2.0)
    (tmp_path / "A" / "seed2" / "metrics.json").write_text(json.dumps({"global_step": 2}))
    argv = ["--out", str(tmp_path), "--variant", "A=model=direct", "--report-only"]
    assert ablate.main([*argv, "--seeds", "0", "1", "2", "--", *TINY]) == 0
    captured = capsys.readouterr()
    assert "| A | 2 | 8 | 2.00 ± 0.00 |" in captured.out
    assert (
        captured.err == f"[left out] {tmp_path / 'A' / 'seed2'}: finished without test scores (test=false)\n"
    )
    assert ablate.main([*argv, "--seeds", "2", "--", *TINY]) == 1
    assert "no finished runs under" in capsys.readouterr().err


def test_a_report_without_variants_is_refused(capsys):
    """The report holds the variants given: without any it would say no run had finished."""
    assert ablate.main(["--out", "abl", "--report-only"]) == 2
    assert (
        capsys.readouterr().err
        == "error: --variant: none given; the report holds the variants x seeds given\n"
    )
