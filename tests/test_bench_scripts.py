"""Every benchmark script runs in its --quick mode and ends with its figures as name=value lines."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest

from bench import (
    action_trace_calibration,
    data_loading,
    decoding,
    default_run,
    grpo,
    pretrained_lm,
    scaling,
    step_levers,
)
from bench.default_run import phase_seconds
from bench.experiments import answer_tokens
from bench.figures_out import cpu_name, print_figures
from bench.pretrained_lm import differences
from lightning_modules.pretrained import SMOLLM2, missing_model
from tests import launched
from timerefine.pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]
FIGURE = re.compile(r"^([A-Za-z_][\w.@]*)=(\S+)$")
SCRIPTS = {
    "default_run": (["--profile"], {"wall_s", "test_mIoU", "prior_mIoU", "peak_rss_mb", "train_steps_s"}),
    "overhead": ([], {"overhead_ratio", "raw_samples_per_s", "project_samples_per_s"}),
    "decoding": ([], {"speedup_vs_hf_generate", "passes_K3_b4_constrained", "match_free_hf_greedy_K3_b4"}),
    "scaling": ([], {"step_time_exponent", "activation_memory_exponent", "decode_ratio_K3"}),
    "gpu_step": ([], {"plain_tokens_per_s", "plain_peak_mem_gb", "fsdp_samples_per_s", "largest_batch"}),
    "step_levers": ([], {"ratio_threads1", "ratio_bf16_autocast", "base_s_per_step"}),
    "data_loading": ([], {"slowest_loader_samples_per_s", "headroom_over_need"}),
    "grpo": ([], {"step_cost_ratio", "wall_cost_ratio", "sft_steps", "gain_mIoU_iou"}),
    "action_trace_calibration": ([], {"best_action_mIoU", "oracle_x0_768d_mIoU", "oracle_x1_768d_mIoU"}),
    "predict_pairs": ([], {"speedup_pairs_batched", "match_answers", "one_video_at_a_time_queries_per_s"}),
    # the scratch arm (model.lm.weights=random, 50 s here) is left out: test_checkpoint_contents runs that
    # path, and test_arm_differences the figures it feeds
    "pretrained_lm": (
        ["--arms", "pretrained,tiny"],
        {"pretrained_minus_tiny_mIoU", "pretrained_minus_prior_mIoU", "tiny_wall_s"},
    ),
}
# What a script's figures must say of each other. bench.grpo: a GRPO step costs more than a supervised
# one, so its ratio over training time alone is above the ratio of wall times, which share start-up,
# validation and the test (the ratio was over wall times before, and gave continued SFT too few steps).
# bench.predict_pairs: batching the queries of several videos changes no answer (fp32).
RELATIONS = {
    "grpo": lambda figures: figures["step_cost_ratio"] > max(1.0, figures["wall_cost_ratio"]),
    "predict_pairs": lambda figures: figures["match_answers"] == 1,
}
NEEDS_SMOLLM2 = {"pretrained_lm"}  # skipped, as the SmolLM2 tests are, only when the model is absent
CHARADES = ROOT.parent / "shared" / "data" / "charades_sta"  # the real annotations, when beside the project
NEEDS_CHARADES = {"action_trace_calibration"}
# Every script names the machine before and after measuring (docs/benchmarks.md), but data_loading,
# which writes it into its report, and action_trace_calibration, which times nothing.
BOTH = ("machine: ", "machine after: ")
MACHINE_LINES = {"data_loading": (), "action_trace_calibration": ("machine: ",)}
EXPERIMENTS = ("answer_tokens", "batch_size_answers", "query_reading_probe")  # research probes, kept runnable


def final_figures(stdout: str) -> dict[str, float]:
    """The name=value lines that end ``stdout``, as floats."""
    figures: dict[str, float] = {}
    for line in reversed(stdout.strip().splitlines()):
        match = FIGURE.match(line.strip())
        if not match:
            break
        figures[match.group(1)] = float(match.group(2))
    return figures


def test_figures_are_printed_last_and_parse(capsys):
    print("a table | x |")
    print_figures({"ratio": 1.23456, "count": 3, "missing": math.nan})
    figures = final_figures(capsys.readouterr().out)
    assert figures["ratio"] == 1.235 and figures["count"] == 3 and math.isnan(figures["missing"])


def test_cpu_name_says_which_bf16_instructions_it_has():
    info = "processor : 0\nmodel name : Some CPU 9000\nflags : fpu avx2 avx512_bf16 amx_bf16\n"
    assert cpu_name(info) == "Some CPU 9000 (AVX-512 BF16 + AMX-BF16)"
    assert cpu_name(info.replace(" avx512_bf16 amx_bf16", "")) == "Some CPU 9000 (no bf16 instructions)"


def test_profiler_phases_come_from_the_last_report():
    log = "\n".join(
        [
            "|  Action  |  Mean duration (s)  |  Num calls  |  Total time (s)  |  Percentage %  |",
            "|  run_training_batch  |  0.5  |  4  |  2.0  |  50 %  |",
            "|  Action  |  Mean duration (s)  |  Num calls  |  Total time (s)  |  Percentage %  |",
            "|  run_training_batch  |  0.5  |  4  |  2.0  |  50 %  |",
            "|  [Strategy]SingleDeviceStrategy.validation_step  |  0.25  |  2  |  0.5  |  10 %  |",
            "|  [Strategy]SingleDeviceStrategy.validation_step  |  0.25  |  1  |  0.25  |  10 %  |",
            "|  [Strategy]SingleDeviceStrategy.test_step  |  1e-01  |  3  |  3e-01  |  5 %  |",
        ]
    )
    phases = phase_seconds(log)
    assert phases["train_steps_s"] == 2.0 and phases["val_s"] == 0.75 and phases["test_s"] == 0.3


def test_arm_differences():
    arms = {
        "pretrained": {"test_mIoU": 40.0, "prior_mIoU": 30.0, "wall_s": 60.0},
        "scratch": {"test_mIoU": 32.5, "prior_mIoU": 30.0, "wall_s": 50.0},
        "tiny": {"test_mIoU": 45.0, "prior_mIoU": 30.0, "wall_s": 10.0},
    }
    assert differences(arms) == {
        "pretrained_minus_prior_mIoU": 10.0,
        "pretrained_minus_scratch_mIoU": 7.5,
        "wall_ratio_pretrained_vs_scratch": 1.2,
        "pretrained_minus_tiny_mIoU": -5.0,
        "wall_ratio_pretrained_vs_tiny": 6.0,
        "scratch_minus_prior_mIoU": 2.5,
    }
    assert differences({"tiny": arms["tiny"]}) == {}


def printed_figures(module: str, *args: str, machine_lines: tuple[str, ...] = BOTH) -> dict[str, float]:
    """The figures ``python -m <module> <args>`` prints last (one intra-op thread), after lines starting
    with each of ``machine_lines``."""
    result = launched.run(["-m", module, *args], env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    for start in machine_lines:
        assert any(line.startswith(start) for line in lines), f"no line starting {start!r}"
    return final_figures(result.stdout)


def quick_figures(script: str, *extra: str) -> dict[str, float]:
    """The figures of ``python -m bench.<script> --quick <extra>``, the machine named as it must be."""
    return printed_figures(
        f"bench.{script}", "--quick", *extra, machine_lines=MACHINE_LINES.get(script, BOTH)
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "script",
    [pytest.param(s, marks=pytest.mark.pretrained) if s in NEEDS_SMOLLM2 else s for s in sorted(SCRIPTS)],
)
def test_bench_script_quick_mode(script):
    if script in NEEDS_SMOLLM2 and (missing := missing_model(SMOLLM2)) is not None:
        pytest.skip(missing)
    if script in NEEDS_CHARADES and not (CHARADES / "charades_sta_test.txt").is_file():
        pytest.skip(f"no Charades-STA annotations in {CHARADES}")
    extra, expected = SCRIPTS[script]
    figures = quick_figures(script, *extra)
    assert expected <= set(figures), f"missing {expected - set(figures)} in {sorted(figures)}"
    assert RELATIONS.get(script, bool)(figures), figures


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_runs_as_a_module(experiment):
    result = launched.run(["-m", f"bench.experiments.{experiment}", "--help"], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"bench.experiments.{experiment}" in result.stdout


@pytest.mark.slow
def test_answer_tokens_measures_every_tokenizer():
    """The probe decodes with each real tokenizer (it read a datamodule method that had gone, and
    ``--help`` alone did not show it)."""
    if not answer_tokens.TOKENIZERS.is_dir():
        pytest.skip(f"no tokenizers in {answer_tokens.TOKENIZERS}")
    figures = printed_figures("bench.experiments.answer_tokens", "--queries", "2", "--repeats", "1")
    assert {f"{name}_canonical_over_digits_decode_time" for name in answer_tokens.NAMES} <= set(figures)


@pytest.mark.slow
def test_decoding_without_single_queries():
    """``--singles 0`` leaves batch 1 out (it divided by zero before)."""
    figures = quick_figures("decoding", "--singles", "0", "--refine-steps", "0")
    assert "speedup_vs_hf_generate" in figures and not [name for name in figures if "_b1_" in name]


@pytest.fixture
def run_folders(monkeypatch) -> list[Path | None]:
    """The output folders the runs of bench.default_run, bench.grpo and bench.pretrained_lm get (none
    is run)."""
    folders: list[Path | None] = []

    def fake_run(overrides, profile, keep, threads=None, extra_env=None) -> dict[str, float]:
        folders.append(keep)
        return {"wall_s": 1.0}

    def fake_train(overrides: list[str], output_dir: Path) -> tuple[float, dict[str, float]]:
        folders.append(output_dir)
        return 1.0, {"wall_s": 1.0, "test/mIoU": 0.0, "test/R1@0.7": 0.0}

    monkeypatch.setattr(default_run, "run_once", fake_run)

    def fake_arm(overrides: list[str], out: Path) -> dict[str, float]:
        folders.append(out)
        return dict.fromkeys(("test_mIoU", "test_R1@0.7", "test_parse_fail", "wall_s", "prior_mIoU"), 1.0)

    monkeypatch.setattr(grpo, "train", fake_train)
    monkeypatch.setattr(pretrained_lm, "arm_figures", fake_arm)
    return folders


def test_default_run_keeps_only_its_last_round(run_folders, tmp_path):
    """Every round is a run of its own; --keep gets the last (round 2 reused round 1's finished run)."""
    default_run.main(["--quick", "--rounds", "2", "--keep", str(tmp_path / "kept")])
    assert run_folders == [None, tmp_path / "kept"]


def test_default_run_keep_is_the_callers_path(run_folders, monkeypatch, tmp_path):
    """A relative --keep is the caller's (train.py runs in the repository: the run went there)."""
    monkeypatch.chdir(tmp_path)
    default_run.main(["--quick", "--keep", "kept"])
    assert run_folders == [tmp_path / "kept"]


def test_grpo_paths_are_the_callers(run_folders, monkeypatch, tmp_path):
    """A relative --keep is the caller's: the runs went into the repository, then metrics.json was
    looked for in the caller's folder (FileNotFoundError)."""
    monkeypatch.chdir(tmp_path)
    grpo.main(["--quick", "--keep", "kept"])
    assert run_folders[0] == tmp_path / "kept" / "base"


def test_grpo_trains_each_setting_once(run_folders, tmp_path):
    """The first seed's GRPO run of the first reward and its continued SFT (here as many steps as the
    cost runs: their ratio is 1) have the cost runs' settings; each ran again, the GRPO one as a
    train.py that found its folder finished."""
    grpo.main(["--quick", "--keep", str(tmp_path / "kept")])
    assert run_folders == [tmp_path / "kept" / name for name in ("base", "iou0", "sft_cost")]


def refused(script, argv: list[str], capsys) -> str:
    """The one error line ``script.main(argv)`` exits 2 with."""
    with pytest.raises(SystemExit) as exit_:
        script.main(argv)
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2, error
    return error


@pytest.mark.parametrize(
    ("script", "argv"),
    [
        (default_run, ["--keep", "full"]),  # a finished run there: train.py would not run again
        (grpo, ["--keep", "full"]),
        (grpo, ["--base", "missing"]),
        (pretrained_lm, ["--keep", "full"]),
    ],
)
def test_path_mistakes_are_one_line(script, argv, run_folders, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "metrics.json").write_text("{}")
    assert argv[0] in refused(script, ["--quick", *argv], capsys)


def test_quick_scaling_leaves_the_published_figure():
    """--quick implies --no-plot, as bench.data_loading's --quick implies --no-write (it replaced
    bench/figures/scaling.png with a smoke test's figure)."""
    assert scaling.parse_args(["--quick"]).no_plot and not scaling.parse_args([]).no_plot


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--only", "foo"], "threads1"),  # the unknown name was dropped: only base ran
        (["--experiment", "smollm2", "--only", "frames_per_token2"], "frames_per_token2"),
    ],
)
def test_step_levers_refuses_variants_it_does_not_run(argv, named, monkeypatch, capsys):
    monkeypatch.setattr(step_levers, "setup", lambda *args: pytest.fail("the benchmark ran"))
    error = refused(step_levers, ["--quick", *argv], capsys)
    assert "--only" in error and named in error


@pytest.mark.parametrize("argv", [["--env", "FOO"], ["--env", "=1"], ["--rounds", "0"], ["--threads", "0"]])
def test_default_run_refuses_argument_mistakes(argv, run_folders, capsys):
    """--env without KEY=VALUE was a ValueError traceback, --rounds 0 an IndexError, --threads 0 the
    inherited thread count."""
    assert argv[0] in refused(default_run, ["--quick", *argv], capsys)


@pytest.mark.parametrize(
    "argv",
    [
        ["--root", "/nonexistent"],
        ["--num-frames", "0"],
        ["--feature-dim", "768", "0"],
        ["--scales", "1", "-1"],
    ],
)
def test_action_trace_calibration_refuses_argument_mistakes(argv, capsys):
    """A --root without the data was a FileNotFoundError traceback, --num-frames 0 a traceback and
    --feature-dim 0 oracle scores of 0, --scales -1 a SpecError traceback."""
    assert argv[0] in refused(action_trace_calibration, ["--quick", "--root", "/nonexistent", *argv], capsys)


@pytest.mark.parametrize(
    "argv",
    [
        ["--videos", "0"],
        ["--num-frames", "0"],
        ["--feature-dim", "0"],
        ["--batch-size", "0"],
        ["--workers", "0", "-1"],
        ["--threads", "0"],
    ],
)
def test_data_loading_refuses_argument_mistakes_before_it_runs(argv, monkeypatch, capsys):
    """Counts below their least were taken (--threads 0 silently kept the inherited thread count)."""
    monkeypatch.setattr(data_loading, "write_folder", lambda *args: pytest.fail("the benchmark ran"))
    assert argv[0] in refused(data_loading, argv, capsys)


@pytest.mark.parametrize(
    "argv", [["--run", "/nonexistent"], ["--refine-steps", "0", "-1"], ["--rounds", "0"], ["--singles", "-1"]]
)
def test_decoding_refuses_argument_mistakes_before_it_runs(argv, monkeypatch, capsys):
    """A --run that is no run was found after the whole benchmark ran, --refine-steps -1 was a
    ConfigError traceback."""
    monkeypatch.setattr(decoding, "random_model", lambda *args: pytest.fail("the benchmark ran"))
    assert argv[0] in refused(decoding, ["--quick", *argv], capsys)


@pytest.mark.parametrize(
    ("script", "argv"),
    [
        (scaling, ["--steps", "0"]),  # ZeroDivisionError
        (scaling, ["--rounds", "0"]),
        (step_levers, ["--batch", "0"]),  # the experiment's batch size, silently
        (grpo, ["--steps", "0"]),
        (pretrained_lm, ["--steps", "0"]),  # experiment=smollm2's steps, silently
        (pretrained_lm, ["--batch", "0"]),
        (pretrained_lm, ["--steps", "10"]),  # train.py refused it: 1,600 projector steps leave none
        (pretrained_lm, ["--projector-steps", "-1"]),
        (grpo, ["--rewards", "iou", "tiou"]),  # found by train.py, after the base run had trained
    ],
)
def test_bad_counts_and_names_are_refused_before_anything_runs(
    script, argv, run_folders, monkeypatch, capsys
):
    if hasattr(script, "setup"):  # bench.scaling, bench.step_levers: their benchmark starts there
        monkeypatch.setattr(script, "setup", lambda *args: pytest.fail("the benchmark ran"))
    assert argv[0] in refused(script, argv, capsys)


@pytest.mark.slow
def test_decoding_scores_a_trained_run_as_its_test_did(builtin_run):
    """Before: ``--run`` failed on every run with an aux head (it unpacked the aux segments of an older
    API), and scored the last segment by exact IoU whatever the run's final choice and protocol."""
    figures = quick_figures("decoding", "--singles", "0", "--refine-steps", "0", "--run", str(builtin_run))
    tested = json.loads((builtin_run / "metrics.json").read_text())
    assert figures["test_mIoU_constrained"] == pytest.approx(tested["test/mIoU"], abs=0.01)
    assert figures["test_mIoU_hf_constrained"] == figures["test_mIoU_constrained"]


def test_scaling_reference_is_the_default_run():
    """bench.scaling's ratios are to the default run's frames per token and K (it kept f = 2, the
    default of before, after the default became 4)."""
    cfg = load_config([])
    assert (cfg.model.projector.frames_per_token, cfg.model.refine.steps) == scaling.DEFAULT


def test_the_class_reader_keeps_evidence_at_the_first_and_last_frame():
    """The moving average repeats the end frames: zeros beyond them would halve a one-frame action there."""
    times = np.arange(10.0)
    for frame in (0, 9):
        evidence = np.zeros(10)
        evidence[frame] = 1.0
        assert action_trace_calibration.decode(evidence, times) == (times[frame], times[frame])
