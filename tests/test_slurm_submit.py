"""Rendering, sweep expansion, validation and dry-run of timerefine/tools/slurm_submit.py (no SLURM needed)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import train
from timerefine.tools import slurm_submit
from timerefine.tools.slurm_submit import JobSpec, expand_sweep, render_sbatch

REPO = Path(__file__).resolve().parents[1]


def render(spec: JobSpec) -> str:
    """The script of ``spec``, every run's composed strategy the default ``auto``."""
    return render_sbatch(spec, ["auto"] * len(expand_sweep(spec.overrides)))


def sbatch_lines(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


def fake_bin(tmp_path: Path, name: str, body: str) -> dict[str, str]:
    """Put an executable ``name`` on PATH; return the environment to run with."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    exe = bindir / name
    exe.write_text(f"#!/bin/bash\n{body}\n")
    exe.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**env, "PATH": f"{bindir}:{env['PATH']}"}


def run_script(script: str, tmp_path: Path, task_id: int | None = None) -> list[str]:
    """Execute a rendered script with a fake srun; return the argv train.py would get."""
    env = fake_bin(tmp_path, "srun", 'printf "%s\\n" "$@" > "$SRUN_ARGS"')
    env.update(SRUN_ARGS=str(tmp_path / "argv"), SLURM_JOB_ID="42")
    if task_id is not None:
        env.update(SLURM_ARRAY_JOB_ID="41", SLURM_ARRAY_TASK_ID=str(task_id))
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    subprocess.run(["bash", str(path)], env=env, cwd=tmp_path, check=True, capture_output=True)
    argv = (tmp_path / "argv").read_text().splitlines()
    return argv[argv.index("train.py") + 1 :]


def test_one_node_cpu_job(tmp_path: Path) -> None:
    spec = JobSpec(overrides=["experiment=tiny", "trainer.max_steps=20"], tasks_per_node=2, time="10")
    script = render(spec)
    lines = sbatch_lines(script)
    assert "#SBATCH --nodes=1" in lines
    assert "#SBATCH --ntasks-per-node=2" in lines
    assert not any("--gres" in line or "--array" in line for line in lines)
    assert {"#SBATCH --requeue", "#SBATCH --open-mode=append", "#SBATCH --signal=USR1@90"} <= set(lines)
    assert "#SBATCH --output=runs/slurm_logs/%x-%j.out" in lines
    argv = run_script(script, tmp_path)
    assert argv == [
        "experiment=tiny",
        "trainer.max_steps=20",
        "output_dir=runs/timerefine/42_0",
        "trainer.num_nodes=1",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "trainer.strategy=ddp",
    ]


def test_single_cpu_task_has_no_ddp(tmp_path: Path) -> None:
    argv = run_script(render(JobSpec(time="5")), tmp_path)
    assert "trainer.devices=1" in argv
    assert not any(a.startswith("trainer.strategy") for a in argv)


def test_two_nodes_eight_gpus(tmp_path: Path) -> None:
    spec = JobSpec(
        overrides=["seed=3"],
        nodes=2,
        gpus_per_node=8,
        cpus_per_task=8,
        mem="256G",
        partition="gpu",
        account="proj",
        qos="high",
        setup=["export FOO=bar"],
        extra_sbatch=["#SBATCH --exclusive", "--constraint=h100"],
    )
    script = render(spec)
    lines = sbatch_lines(script)
    for expected in (
        "--nodes=2",
        "--ntasks-per-node=8",
        "--gres=gpu:8",
        "--cpus-per-task=8",
        "--mem=256G",
        "--partition=gpu",
        "--account=proj",
        "--qos=high",
        "--exclusive",
        "--constraint=h100",
    ):
        assert f"#SBATCH {expected}" in lines
    assert "\nexport FOO=bar\n" in script
    argv = run_script(script, tmp_path)
    assert "trainer.num_nodes=2" in argv and "trainer.devices=8" in argv
    assert "trainer.accelerator=gpu" in argv and "trainer.strategy=ddp" in argv


def test_user_strategy_is_kept(tmp_path: Path) -> None:
    script = render_sbatch(JobSpec(overrides=["trainer.strategy=fsdp"], gpus_per_node=4), ["fsdp"])
    argv = run_script(script, tmp_path)
    assert [a for a in argv if a.startswith("trainer.strategy")] == ["trainer.strategy=fsdp"]


def test_the_composed_strategy_is_kept(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Before: only a literal ``trainer.strategy=`` was seen, so ``trainer=fsdp`` ran as DDP."""
    argv = ["--gpus-per-node", "2", "--dry-run", "--"]
    assert slurm_submit.main([*argv, "trainer=fsdp"]) == 0
    assert not any(a.startswith("trainer.strategy") for a in run_script(capsys.readouterr().out, tmp_path))
    assert slurm_submit.main([*argv, "trainer=fsdp,gpu"]) == 0  # gpu leaves it auto: that run gets ddp
    script = capsys.readouterr().out
    assert run_script(script, tmp_path, task_id=0)[0] == "trainer=fsdp"
    assert "trainer.strategy" not in " ".join(run_script(script, tmp_path, task_id=0))
    assert run_script(script, tmp_path, task_id=1)[:2] == ["trainer=gpu", "trainer.strategy=ddp"]


def test_expand_sweep_cartesian_product() -> None:
    runs = expand_sweep(["experiment=tiny", "model.refine.steps=0,1,2,3", "seed=1,2"])
    assert len(runs) == 8
    assert runs[0] == ["experiment=tiny", "model.refine.steps=0", "seed=1"]
    assert runs[1] == ["experiment=tiny", "model.refine.steps=0", "seed=2"]
    assert runs[7] == ["experiment=tiny", "model.refine.steps=3", "seed=2"]
    assert expand_sweep(["a=1"]) == [["a=1"]]
    assert expand_sweep([]) == [[]]


def test_expand_sweep_keeps_lists_and_quotes() -> None:
    assert expand_sweep(["x=[1,2]", "y='a,b'", "f=g(1,2)", "~z"]) == [
        ["x=[1,2]", "y='a,b'", "f=g(1,2)", "~z"]
    ]
    assert expand_sweep(["x=[1,2],[3]"]) == [["x=[1,2]"], ["x=[3]"]]


def test_sweep_becomes_one_array(tmp_path: Path) -> None:
    spec = JobSpec(overrides=["model.refine.steps=0,1,2,3", "seed=1,2"], job_name="sweep", max_parallel=3)
    script = render(spec)
    lines = sbatch_lines(script)
    assert "#SBATCH --array=0-7%3" in lines
    assert "#SBATCH --output=runs/slurm_logs/%x-%A_%a.out" in lines
    for index, expected in enumerate(expand_sweep(spec.overrides)):
        argv = run_script(script, tmp_path, task_id=index)
        assert argv[:2] == expected
        assert f"output_dir=runs/sweep/41_{index}" in argv


def test_unknown_array_index_fails(tmp_path: Path) -> None:
    with pytest.raises(subprocess.CalledProcessError):
        run_script(render(JobSpec(overrides=["seed=1,2"])), tmp_path, task_id=5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nodes": 0}, "nodes must be >= 1"),
        ({"cpus_per_task": 0}, "cpus-per-task must be >= 1"),
        ({"gpus_per_node": -1}, "gpus-per-node must be >= 0"),
        ({"gpus_per_node": 8, "tasks_per_node": 2}, "one task per GPU"),
        ({"time": "1:2:3:4"}, "bad time"),
        ({"time": "1h"}, "bad time"),
        ({"time": "1"}, "may come 150 s before the time limit"),
        ({"time": "2:30"}, "which --time 2:30 does not exceed"),  # was accepted (review)
        ({"mem": "lots"}, "bad mem"),
        ({"signal": "B:USR1@90"}, "bad signal"),
        ({"signal": "USR2@90"}, "bad signal"),
        ({"job_name": "bash"}, "bad job name"),
        ({"job_name": "a/b"}, "bad job name"),
        ({"overrides": ["seed=1,,2"]}, "empty value in sweep"),
        ({"overrides": ["trainer.devices=4"]}, "is set by the tool"),
        ({"overrides": ["output_dir=/tmp/x"]}, "is set by the tool"),
    ],
)
def test_validation_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        render(JobSpec(**kwargs))


@pytest.mark.parametrize(
    "time", ["30", "30:00", "12:00:00", "2-00", "1-12:30", "1-12:30:00", "INFINITE", "0", "0-0"]
)  # 0: no limit (was refused as too short for the requeue signal)
def test_valid_times(time: str) -> None:
    assert f"#SBATCH --time={time}" in render(JobSpec(time=time))


def test_dry_run_prints_and_does_not_submit(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def no_subprocess(*args: object, **kwargs: object) -> None:
        raise AssertionError("dry run must not call sbatch")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    assert slurm_submit.main(["--dry-run", "--nodes", "2", "--gpus-per-node", "8", "--", "seed=1,2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("#!/bin/bash") and "#SBATCH --array=0-1" in out


def test_cli_errors_exit_2(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        slurm_submit.main(["--dry-run", "--time", "soon"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "bad time" in err and err.count("\n") == 1  # no usage block before it
    with pytest.raises(SystemExit) as exc:
        slurm_submit.main(["--dry-run", "--nodes", "abc"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "invalid int value: 'abc'" in err


@pytest.mark.parametrize("dry_run", [["--dry-run"], []])
def test_overrides_are_checked_before_anything_is_submitted(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, dry_run: list[str]
) -> None:
    """Before: rendered and submitted; the typo surfaced only when the queued job ran."""

    def no_subprocess(*args: object, **kwargs: object) -> None:
        raise AssertionError("a config mistake must not reach sbatch")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    assert slurm_submit.main([*dry_run, "--", "experiment=tiny", "seed=1,2", "trainer.max_steps=abc"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("config error: trainer.max_steps")
    # what train.py refuses as it starts (was: submitted, and each job failed once it ran; found by review)
    assert slurm_submit.main([*dry_run, "--", "experiment=tiny", "model.lm.dtype=bfloat16"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("config error: model.lm.dtype=bfloat16 with")


@pytest.mark.parametrize("flag", ["--log-dir", "--runs-dir"])
def test_folders_the_job_cannot_write_are_refused_before_it_queues(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, read_only_folder: Path, flag: str
) -> None:
    """Before (review): the log folder's OSError exited 1; a read-only runs folder queued the job, which
    failed with a traceback once it ran."""

    def no_subprocess(*args: object, **kwargs: object) -> None:
        raise AssertionError("the job must not reach sbatch")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    folder = read_only_folder / "sub"
    assert slurm_submit.main([flag, str(folder), "--", "experiment=tiny"]) == 2
    reason = f"{read_only_folder} is not writable here (no write access, or a read-only file system)"
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {flag} {folder}: {reason}"]


def test_submit_parses_job_id(tmp_path: Path) -> None:
    env = fake_bin(tmp_path, "sbatch", f'cat > {tmp_path}/stdin; echo "Submitted batch job 1234"')
    (tmp_path / "train.py").touch()  # the job's workdir
    cmd = [
        sys.executable,
        "-m",
        "timerefine.tools.slurm_submit",
        "--workdir",
        str(tmp_path),
        "--log-dir",
        "logs",
        "--",
        "seed=1,2",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "1234"
    assert "#SBATCH --array=0-1" in (tmp_path / "stdin").read_text()
    assert (tmp_path / "logs").is_dir()


def test_a_job_sbatch_refuses_is_one_line(tmp_path: Path) -> None:
    """Before (review): exit 1 and sbatch's lines as they came, after 'slurm_submit: sbatch failed (1): '."""
    refusal = 'echo "sbatch: error: invalid partition specified: nope" >&2'
    failed = 'echo "sbatch: error: Batch job submission failed: Invalid partition name specified" >&2'
    env = fake_bin(tmp_path, "sbatch", f"{refusal}; {failed}; exit 1")
    (tmp_path / "train.py").touch()
    cmd = [sys.executable, "-m", "timerefine.tools.slurm_submit", "--workdir", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: sbatch refused the job (exit status 1): sbatch: error: invalid partition specified: nope; "
        "sbatch: error: Batch job submission failed: Invalid partition name specified"
    ]


DOCUMENTED_DRY_RUNS = {
    "2 nodes x 8 GPUs": [
        "--nodes", "2", "--gpus-per-node", "8", "--cpus-per-task", "12", "--mem", "480G", "--time", "1-00:00:00",
        "--partition", "gpu", "--account", "my_project", "--setup", "module load cuda/12.4",
        "--setup", "source .venv/bin/activate", "--workdir", "/home/me/timerefine", "--job-name", "tr-7b",
        "--dry-run", "--", "model.lm.name_or_path=Qwen/Qwen2.5-7B-Instruct", "model.lora.enabled=true",
        "trainer.precision=bf16-mixed", "data.global_batch_size=512",
    ],
    "paper scale": [
        "--gpus-per-node", "8", "--cpus-per-task", "8", "--mem", "480G", "--time", "2-00:00:00",
        "--workdir", "/home/me/timerefine", "--job-name", "tr-charades", "--dry-run", "--",
        "experiment=paper_charades", "data.source.root=/data/charades_sta",
        "data.source.feature_path=/data/charades_sta/clip_vit_l14",
    ],
}  # fmt: skip


@pytest.mark.parametrize("example", sorted(DOCUMENTED_DRY_RUNS))
def test_docs_show_the_current_dry_run(example: str, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """docs/cluster.md pastes the dry-run of these commands (run where /home/me/timerefine is); each
    must stay the real output."""
    workdir = "/home/me/timerefine"
    assert (
        slurm_submit.main([str(tmp_path) if a == workdir else a for a in DOCUMENTED_DRY_RUNS[example]]) == 0
    )
    assert (
        capsys.readouterr().out.replace(str(tmp_path), workdir) in (REPO / "docs" / "cluster.md").read_text()
    )


def test_relative_paths_are_checked_where_the_job_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Before: checked from the caller's folder, though the job runs in --workdir (sbatch --chdir), so
    a run there passed only where it was missing and was refused where it was."""
    tiny = [
        "experiment=tiny",
        "data.source.num_train=8",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
    ]
    assert train.main([*tiny, f"output_dir={tmp_path / 'repo' / 't1'}"]) == 0  # read as train.py reads it
    (tmp_path / "elsewhere").mkdir()
    argv = ["--dry-run", "--", "experiment=grpo", "init_from_run=t1"]
    monkeypatch.chdir(tmp_path / "repo")
    assert slurm_submit.main(["--workdir", str(tmp_path / "elsewhere"), *argv]) == 2
    refused = (  # where the job would look for it
        "config error: init_from_run=t1: t1 is not a run directory (config.yaml and checkpoints/), "
        f"relative to {tmp_path / 'elsewhere'}"
    )
    assert capsys.readouterr().err == refused + "\n"
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert slurm_submit.main(["--workdir", str(tmp_path / "repo"), *argv]) == 0
    assert Path.cwd() == tmp_path / "elsewhere"  # the caller's folder again
    capsys.readouterr()  # a stage is judged with its run's settings (before: submitted, refused as it ran)
    assert (
        slurm_submit.main(["--workdir", str(tmp_path / "repo"), *argv, "model.lm.tokenizer_vocab_size=500"])
        == 2
    )
    assert capsys.readouterr().err.startswith(
        "config error: model.lm.tokenizer_vocab_size=500: a run started"
    )
    assert slurm_submit.main(["--workdir", "missing", *argv[1:]]) == 2  # a job that would not start
    assert capsys.readouterr().err == "error: --workdir missing: no such folder here (the job runs in it)\n"
    monkeypatch.chdir(tmp_path / "repo")  # a script written here for another machine
    assert slurm_submit.main(["--workdir", "/home/me/timerefine", *argv]) == 0
    note = (
        f"note: --workdir /home/me/timerefine is no folder here: paths were checked from {tmp_path / 'repo'}"
    )
    assert capsys.readouterr().err == note + "\n"


def test_a_global_batch_the_jobs_processes_cannot_split_is_refused(capsys: pytest.CaptureFixture) -> None:
    """Before: checked only when the queued job started (2 nodes x 3 GPUs = 6 processes of 8 each)."""
    argv = ["--nodes", "2", "--gpus-per-node", "3", "--dry-run", "--", "data.global_batch_size=64"]
    assert slurm_submit.main([*argv, "data.batch_size=8"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("config error: data.global_batch_size=64 is not a")
    assert "8 x 6 = 48" in captured.err and captured.err.count("\n") == 1
    assert slurm_submit.main([*argv, "data.batch_size=4"]) == 2  # 4 x 6 = 24 does not divide 64 either
    assert slurm_submit.main(["--nodes", "2", "--gpus-per-node", "4", *argv[4:], "data.batch_size=8"]) == 0
