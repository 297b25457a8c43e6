"""Submit train.py to SLURM: one job, or one job array for a Hydra-style sweep.

Example::

    timerefine-slurm-submit --nodes 2 --gpus-per-node 8 --time 12:00:00 -- experiment=tiny seed=1,2

Everything after ``--`` is passed to ``train.py`` as overrides; comma lists become an array job.
See docs/cluster.md.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import subprocess
import sys
from pathlib import Path

from callbacks.global_batch import accumulation
from grounding.checks import a_writable_folder
from timerefine.pipeline.arguments import OneLineParser
from timerefine.pipeline.config import ConfigError
from timerefine.pipeline.init_from_run import train_config
from timerefine.pipeline.previous_run import may_train
from timerefine.tools.sbatch_template import JobSpec, expand_sweep, render_sbatch, validate

REPO = Path(__file__).resolve().parents[2]

__all__ = [
    "JobSpec",
    "build_parser",
    "composed_strategies",
    "expand_sweep",
    "main",
    "render_sbatch",
    "spec_from_args",
    "submit",
]


def build_parser() -> argparse.ArgumentParser:
    """The CLI; defaults mirror :class:`JobSpec`."""
    d = JobSpec()
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=d.nodes, help="-> --nodes and trainer.num_nodes")
    p.add_argument(
        "--gpus-per-node",
        type=int,
        default=d.gpus_per_node,
        help="-> --gres=gpu:G, --ntasks-per-node=G and trainer.devices=G (0: CPU job)",
    )
    p.add_argument(
        "--tasks-per-node",
        type=int,
        default=d.tasks_per_node,
        help="CPU jobs only: -> --ntasks-per-node and trainer.devices",
    )
    p.add_argument("--cpus-per-task", type=int, default=d.cpus_per_task, help="-> --cpus-per-task")
    p.add_argument("--mem", help="-> --mem (e.g. 64G); omitted: the partition default")
    p.add_argument("--time", default=d.time, help="-> --time (MM, HH:MM:SS, D-HH:MM:SS)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument(
        "--signal",
        default=d.signal,
        help="-> --signal (USR1@SECONDS); train.py saves an HPC checkpoint and requeues on it ('': off)",
    )
    p.add_argument("--no-requeue", dest="requeue", action="store_false", help="render --no-requeue")
    p.add_argument(
        "--extra-sbatch",
        action="append",
        default=[],
        metavar="LINE",
        help="extra '#SBATCH ...' line (repeatable; use --extra-sbatch=--flag=x for bare flags)",
    )
    p.add_argument(
        "--setup",
        action="append",
        default=[],
        metavar="CMD",
        help="shell line run before srun, e.g. 'module load cuda' (repeatable)",
    )
    p.add_argument("--job-name", default=d.job_name)
    p.add_argument("--log-dir", default=d.log_dir, help="stdout/stderr dir (relative to --workdir)")
    p.add_argument(
        "--runs-dir",
        default=d.runs_dir,
        help="run dirs go to RUNS_DIR/JOB_NAME/<jobid>_<arrayindex> (relative to --workdir)",
    )
    p.add_argument("--workdir", default=str(REPO), help="directory train.py is run from (sbatch --chdir)")
    p.add_argument("--max-parallel", type=int, help="array jobs: at most this many tasks at once (%%N)")
    p.add_argument("--python", default=d.python, help="python executable on the compute nodes")
    p.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    p.add_argument("overrides", nargs="*", help="train.py overrides (after --); a,b,c lists sweep")
    return p


def spec_from_args(args: argparse.Namespace) -> JobSpec:
    """Map parsed CLI arguments onto a :class:`JobSpec`."""
    fields = set(JobSpec.__dataclass_fields__)
    return JobSpec(**{k: v for k, v in vars(args).items() if k in fields})


def submit(script: str, spec: JobSpec) -> str:
    """Submit ``script`` with sbatch (read from stdin) and return the job id."""
    workdir = Path(spec.workdir or ".")
    (workdir / spec.log_dir).mkdir(parents=True, exist_ok=True)  # SLURM does not create log dirs
    proc = subprocess.run(["sbatch"], input=script, capture_output=True, text=True, check=False)
    match = re.search(r"Submitted batch job (\d+)", proc.stdout)
    if proc.returncode != 0 or not match:
        said = "; ".join((proc.stderr.strip() or proc.stdout.strip()).splitlines())
        raise RuntimeError(f"sbatch refused the job (exit status {proc.returncode}): {said}")
    return match.group(1)


def composed_strategies(spec: JobSpec, folder: str, remote: bool = False) -> list[object]:
    """Each run's ``trainer.strategy``, its config checked as ``train.py`` checks it from ``folder``
    (``--workdir``, where the job runs, so relative paths are the job's), ``data.global_batch_size`` split
    by the job's processes, and a ``resume`` a requeue can keep, that exists unless the job's folder is
    ``remote`` (a dry run for another machine); ConfigError or ValueError if not."""
    strategies = []
    with contextlib.chdir(folder):
        for overrides in expand_sweep(spec.overrides):
            cfg = train_config(overrides)
            may_train(cfg)  # train.py refuses it as the job starts
            if spec.requeue and cfg.resume is None:
                raise ConfigError(
                    "resume=null: a requeued job continues from the checkpoints it wrote, which "
                    "resume=null refuses; keep resume=auto (or a checkpoint), or give --no-requeue"
                )
            if cfg.resume not in (None, "auto") and not remote and not Path(cfg.resume).exists():
                raise ConfigError(f"resume={cfg.resume}: no such checkpoint file")
            if cfg.data.global_batch_size:  # the job's processes must split it, as train.py checks at start
                accumulation(cfg.data.global_batch_size, cfg.data.batch_size, spec.nodes * spec.devices)
            strategies.append(cfg.trainer.strategy)
    return strategies


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: check, render, then print (``--dry-run``) or submit."""
    parser = build_parser()
    args = parser.parse_args(argv)
    spec = spec_from_args(args)
    try:
        validate(spec)
    except ValueError as err:
        parser.error(str(err))
    folder, remote = args.workdir, not Path(args.workdir).is_dir()
    if remote:
        if not args.dry_run:
            print(f"error: --workdir {folder}: no such folder here (the job runs in it)", file=sys.stderr)
            return 2
        folder = "."  # a script written here for another machine
        print(
            f"note: --workdir {args.workdir} is no folder here: paths were checked from {Path.cwd()}",
            file=sys.stderr,
        )
    elif not (Path(folder) / "train.py").is_file() and not args.dry_run:
        print(
            f"error: --workdir {folder}: no train.py there (the job runs python train.py in it)",
            file=sys.stderr,
        )
        return 2
    try:  # a mistake found now, not after the job has queued
        script = render_sbatch(spec, composed_strategies(spec, folder, remote))
    except (ConfigError, ValueError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(script, end="")
        return 0
    for flag, folder in (("--log-dir", spec.log_dir), ("--runs-dir", spec.runs_dir)):
        if reason := a_writable_folder(str(Path(spec.workdir or ".") / folder)):  # else the job fails
            print(f"error: {flag} {folder}: {reason}", file=sys.stderr)
            return 2
    try:
        job_id = submit(script, spec)
    except RuntimeError as err:  # the partition, account or resources asked for: the user's to fix
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # no sbatch here
        print(f"error: {err}", file=sys.stderr)
        return 1
    runs = len(expand_sweep(spec.overrides))
    print(f"Submitted batch job {job_id}" + (f" (array of {runs})" if runs > 1 else ""), file=sys.stderr)
    print(job_id)  # stdout carries only the id: JOB=$(timerefine-slurm-submit ...)
    return 0


if __name__ == "__main__":
    sys.exit(main())
