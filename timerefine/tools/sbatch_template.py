"""Pure pieces of the SLURM submission tool: the job spec, sweep expansion and the sbatch script renderer.

Every resource in the rendered script is derived from one :class:`JobSpec`, and the same numbers are passed
to ``train.py`` as Trainer overrides, so ``--nodes``/``--ntasks-per-node`` can never disagree with
``trainer.num_nodes``/``trainer.devices`` (Lightning's SLURMEnvironment refuses to start when they do).
"""

from __future__ import annotations

import itertools
import re
import shlex
from dataclasses import dataclass, field

# Overrides the renderer owns: they are derived from the spec and must not be given by hand.
RESERVED_KEYS = ("output_dir", "trainer.num_nodes", "trainer.devices", "trainer.accelerator")
_TIME_RE = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$|^(INFINITE|UNLIMITED)$")
_MEM_RE = re.compile(r"^\d+[KMGT]?$")
_SIGNAL_RE = re.compile(r"^(R:)?(SIG)?USR1@(\d+)$")
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")
_OPTION_RE = re.compile(r"^(--[^=\s]*|-.?|)[=\s]*(.*)$")  # --x=y, --x y, -c4, -c 4: the option, its value
DDP = "trainer.strategy=ddp"  # for a job of more than one process whose config leaves the strategy auto


@dataclass
class JobSpec:
    """Everything needed to render one sbatch script (one job, or one job array for a sweep)."""

    overrides: list[str] = field(default_factory=list)
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 1  # only for CPU jobs; with GPUs there is one task per GPU
    cpus_per_task: int = 4
    mem: str | None = None
    time: str = "24:00:00"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    signal: str = "USR1@90"
    requeue: bool = True
    extra_sbatch: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)
    job_name: str = "timerefine"
    log_dir: str = "runs/slurm_logs"
    runs_dir: str = "runs"
    workdir: str | None = None  # sbatch --chdir; train.py is run from here
    python: str = "python"
    max_parallel: int | None = None

    @property
    def devices(self) -> int:
        """Tasks (= Trainer devices) per node."""
        return self.gpus_per_node if self.gpus_per_node > 0 else self.tasks_per_node


# sbatch options the tool renders from its own flags: given through --extra-sbatch, they would leave the
# script and the Trainer overrides at odds (or the run directory and logs elsewhere than the tool says).
OWNED_OPTIONS = {
    "--nodes": "--nodes", "-N": "--nodes", "--ntasks": "--nodes/--gpus-per-node/--tasks-per-node",
    "-n": "--nodes/--gpus-per-node/--tasks-per-node", "--ntasks-per-node": "--gpus-per-node/--tasks-per-node",
    "--gpus": "--gpus-per-node", "-G": "--gpus-per-node", "--gpus-per-node": "--gpus-per-node",
    "--cpus-per-task": "--cpus-per-task", "-c": "--cpus-per-task", "--array": "a sweep (a,b in an override)",
    "-a": "a sweep (a,b in an override)", "--chdir": "--workdir", "-D": "--workdir", "--output": "--log-dir",
    "-o": "--log-dir", "--error": "--log-dir", "-e": "--log-dir", "--job-name": "--job-name",
    "-J": "--job-name", "--signal": "--signal", "--time": "--time", "-t": "--time",
    "--requeue": "no flag: the tool requeues by default", "--no-requeue": "--no-requeue",
    "--open-mode": "nothing: the tool appends, so a requeued job's log goes on",
}  # fmt: skip
SIGNAL_RESOLUTION = 60  # seconds: SLURM may send --signal this much earlier than asked (man sbatch)


def _split_top_level(value: str) -> list[str]:
    """Split ``value`` on commas that are not inside brackets, braces, parentheses or quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(value):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(value[start:i])
            start = i + 1
    parts.append(value[start:])
    return parts


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Expand Hydra multirun-style comma lists (``a=1,2 b=x,y``) into the Cartesian product of overrides.

    Values inside ``[...]``, ``{...}``, ``(...)`` or quotes are never split. Order: the last key varies
    fastest, like Hydra's basic sweeper. Without comma lists the result is ``[overrides]``.
    """
    choices: list[list[str]] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            choices.append([item])
            continue
        values = _split_top_level(value)
        if len(values) > 1 and any(not v.strip() for v in values):
            raise ValueError(f"empty value in sweep {item!r}")
        if len(values) > 1 and len(set(values)) < len(values):
            raise ValueError(f"sweep {item!r} repeats a value: its runs would be the same")
        if len(values) > 1 and sum(o.partition("=")[0] == key for o in overrides) > 1:
            raise ValueError(f"sweep {item!r}: {key} is given more than once, and only the last one counts")
        choices.append([f"{key}={v}" for v in values])
    return [list(combo) for combo in itertools.product(*choices)]


def _seconds(time_str: str) -> float:
    """Length of a SLURM time limit in seconds (``inf`` for INFINITE/UNLIMITED and 0, which SLURM
    reads as no limit)."""
    if not time_str[0].isdigit():
        return float("inf")
    days, _, rest = time_str.rpartition("-")
    fields = [int(x) for x in rest.split(":")]
    if days:  # days-hours[:minutes[:seconds]]
        fields += [0] * (3 - len(fields))
        hours, minutes, secs = fields
        return ((int(days) * 24 + hours) * 60 + minutes) * 60 + secs or float("inf")
    # minutes | minutes:seconds | hours:minutes:seconds
    scale = {1: (60,), 2: (60, 1), 3: (3600, 60, 1)}[len(fields)]
    return sum(f * s for f, s in zip(fields, scale, strict=True)) or float("inf")


def gres_gpus(value: str) -> int:
    """The GPUs a node that a ``--gres`` value asks for (``gpu:a100:4,gpu:v100:4(S:0-1),lscratch:1``: 8)."""
    items = re.sub(r"\([^)]*\)", "", value.strip("'\"")).split(",")
    fields = [item.split(":") for item in items if item.split(":")[0] == "gpu"]
    return sum(int(parts[-1]) if parts[-1].isdigit() else 1 for parts in fields)


def extra_option_error(text: str, gpus_per_node: int) -> str | None:
    """Why the sbatch option ``text`` (``--x=y``, ``--x y``, ``-c4``) may not be added to the script: one
    the tool renders, a ``--gres`` without ``--gpus-per-node``'s GPU count, ``--gpus-per-task`` other
    than 1 (one task per GPU); None when it may."""
    option, value = _OPTION_RE.match(text).groups()
    if option in OWNED_OPTIONS:
        return (
            f"{option} is rendered by the tool, with the Trainer settings that go with it; "
            f"use {OWNED_OPTIONS[option]}"
        )
    if option == "--gres" and (count := gres_gpus(value)) != gpus_per_node:
        return (
            f"{count} GPUs a node, and --gpus-per-node (the Trainer's devices) is {gpus_per_node}: this "
            "--gres stands beside the script's own, so give it the same count (gpu[:type]:N)"
        )
    if option == "--gpus-per-task" and value != "1":
        return "a task per GPU is what the tool renders: --gpus-per-task=1 only"
    return None


def validate(spec: JobSpec) -> None:
    """Raise ``ValueError`` with an actionable message for an inconsistent or malformed spec."""
    for name in ("nodes", "cpus_per_task", "tasks_per_node"):
        if getattr(spec, name) < 1:
            raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(spec, name)}")
    if spec.gpus_per_node < 0:
        raise ValueError(f"gpus-per-node must be >= 0, got {spec.gpus_per_node}")
    if spec.gpus_per_node > 0 and spec.tasks_per_node not in (1, spec.gpus_per_node):
        raise ValueError("with GPUs there is one task per GPU; drop --tasks-per-node")
    if spec.max_parallel is not None and spec.max_parallel < 1:
        raise ValueError(f"max-parallel must be >= 1, got {spec.max_parallel}")
    if not _TIME_RE.match(spec.time):
        raise ValueError(f"bad time {spec.time!r}; use MM, HH:MM:SS, D-HH, D-HH:MM[:SS] or INFINITE")
    if spec.mem is not None and not _MEM_RE.match(spec.mem):
        raise ValueError(f"bad mem {spec.mem!r}; use e.g. 64G or 16000M")
    if not _NAME_RE.match(spec.job_name) or spec.job_name in ("bash", "interactive"):
        raise ValueError(
            f"bad job name {spec.job_name!r}: use [A-Za-z0-9._-], and not bash/interactive "
            "(Lightning then ignores SLURM)"
        )
    if spec.signal:
        match = _SIGNAL_RE.match(spec.signal)
        if not match:
            raise ValueError(
                f"bad signal {spec.signal!r}; use USR1@<seconds>: train.py requeues on SIGUSR1, which must "
                "reach the srun tasks (B: would only reach the batch shell)"
            )
        if (early := int(match.group(3)) + SIGNAL_RESOLUTION) >= _seconds(spec.time):
            raise ValueError(
                f"signal {spec.signal} may come {early} s before the time limit (SLURM sends it up to "
                f"{SIGNAL_RESOLUTION} s early), which --time {spec.time} does not exceed: the job would "
                "be requeued before it trains"
            )
    for line in spec.extra_sbatch:
        if reason := extra_option_error(line.removeprefix("#SBATCH").strip(), spec.gpus_per_node):
            raise ValueError(f"--extra-sbatch {line!r}: {reason}")
    for flag, path in (("workdir", spec.workdir), ("log-dir", spec.log_dir), ("runs-dir", spec.runs_dir)):
        if path and ('"' in path or "\n" in path):
            raise ValueError(f"--{flag} {path!r}: a path with a double quote or a line break")
    for item in spec.overrides:
        if item.partition("=")[0].lstrip("+~") in RESERVED_KEYS:
            raise ValueError(
                f"{item!r} is set by the tool; use --nodes/--gpus-per-node/--tasks-per-node/"
                "--runs-dir instead"
            )
    if len(expand_sweep(spec.overrides)) == 1 and spec.max_parallel is not None:
        raise ValueError("--max-parallel limits the tasks of a sweep (a job array); this job has one run")


def _directive(option: str, value: object) -> str:
    """``#SBATCH --option=value``, the value in double quotes where it holds a space (sbatch splits it)."""
    text = str(value)
    return f'#SBATCH --{option}="{text}"' if re.search(r"\s", text) else f"#SBATCH --{option}={text}"


def _trainer_overrides(spec: JobSpec, ddp: bool) -> list[str]:
    """Trainer overrides that mirror the rendered resources, and :data:`DDP` where ``ddp``."""
    return [
        f"trainer.num_nodes={spec.nodes}",
        f"trainer.devices={spec.devices}",
        f"trainer.accelerator={'gpu' if spec.gpus_per_node else 'cpu'}",
        *([DDP] if ddp else []),
    ]


def _needs_ddp(spec: JobSpec, strategies: list[object]) -> list[bool]:
    """Per run: whether it gets ``trainer.strategy=ddp``, which a job of more than one process does
    where its composed strategy is the default ``auto``; a chosen one (``trainer=fsdp``, an
    experiment's, ``trainer.strategy=...``) is kept."""
    return [spec.nodes * spec.devices > 1 and strategy == "auto" for strategy in strategies]


def _bash_array(name: str, items: list[str]) -> str:
    return f"{name}=({' '.join(shlex.quote(i) for i in items)})"


def render_sbatch(spec: JobSpec, strategies: list[object]) -> str:
    """Render the sbatch script for ``spec``, whose runs (``expand_sweep``) compose to ``strategies``
    (each one's ``trainer.strategy``); a sweep becomes one job array indexed by SLURM_ARRAY_TASK_ID."""
    validate(spec)
    ddp = _needs_ddp(spec, strategies)
    runs = [
        [*run, DDP] if needs and not all(ddp) else run  # on the srun line when every run needs it
        for run, needs in zip(expand_sweep(spec.overrides), ddp, strict=True)
    ]
    is_array = len(runs) > 1
    log = f"{spec.log_dir}/%x-%A_%a" if is_array else f"{spec.log_dir}/%x-%j"
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={spec.job_name}",
        *([_directive("chdir", spec.workdir)] if spec.workdir else []),
        f"#SBATCH --nodes={spec.nodes}",
        f"#SBATCH --ntasks-per-node={spec.devices}",
        f"#SBATCH --cpus-per-task={spec.cpus_per_task}",
    ]
    if spec.gpus_per_node:
        lines.append(f"#SBATCH --gres=gpu:{spec.gpus_per_node}")
    if spec.mem:
        lines.append(f"#SBATCH --mem={spec.mem}")
    lines.append(f"#SBATCH --time={spec.time}")
    lines += [
        f"#SBATCH --{key}={value}" for key in ("partition", "account", "qos") if (value := getattr(spec, key))
    ]
    if spec.signal:
        lines.append(f"#SBATCH --signal={spec.signal}")
    lines += [
        "#SBATCH --requeue" if spec.requeue else "#SBATCH --no-requeue",
        "#SBATCH --open-mode=append",
        _directive("output", f"{log}.out"),
        _directive("error", f"{log}.err"),
    ]
    if is_array:
        limit = f"%{spec.max_parallel}" if spec.max_parallel else ""
        lines.append(f"#SBATCH --array=0-{len(runs) - 1}{limit}")
    lines += [x if x.startswith("#SBATCH") else f"#SBATCH {x}" for x in spec.extra_sbatch]
    # No `set -u`: `module load` and some activate scripts read unset variables.
    lines += ["", "set -eo pipefail", "export PYTHONUNBUFFERED=1", *spec.setup, ""]
    if is_array:
        lines.append('case "$SLURM_ARRAY_TASK_ID" in')
        lines += [f"  {i}) {_bash_array('OVERRIDES', run)} ;;" for i, run in enumerate(runs)]
        lines += ['  *) echo "unknown array index $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;', "esac"]
    else:
        lines.append(_bash_array("OVERRIDES", runs[0]))
    # Derived from the job id only, so a requeued job writes to (and resumes from) the same directory.
    job = '"${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}_${SLURM_ARRAY_TASK_ID:-0}"'
    lines += [
        f"RUN_DIR={shlex.quote(f'{spec.runs_dir}/{spec.job_name}')}/{job}",  # the path as typed, unexpanded
        'echo "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $(hostname): $RUN_DIR ${OVERRIDES[*]}"',
        f'srun --kill-on-bad-exit=1 {shlex.quote(spec.python)} train.py "${{OVERRIDES[@]}}" \\',
        f'  output_dir="$RUN_DIR" {" ".join(_trainer_overrides(spec, all(ddp)))}',
    ]
    return "\n".join(lines) + "\n"
