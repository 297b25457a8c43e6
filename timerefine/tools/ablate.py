"""Run an ablation sequentially on one machine, then write results.csv, results.md and results.png.

    timerefine-ablate --out runs/ablation --seeds 0 1 2 \\
        --variant direct="model=direct" \\
        --variant K3_aux="model.refine.steps=3 model.aux.weight=1.0" \\
        -- trainer.max_steps=1500

A comma list (``model.refine.steps=0,1,2,3``) inside a variant expands to one variant per value.
``seed`` and ``output_dir`` are the tool's (``--seeds``, ``--out``). A run finished with the same
settings is skipped, so an interrupted ablation continues where it stopped; any other run is
train.py's to continue (``trainer.max_steps`` raised) or to refuse (a variant redefined under its old
name). The report holds exactly the variants x seeds given, each run finished with its settings;
other folders under ``--out`` (other seeds, other variants, a refused run's old scores) are left out,
and a report that holds no run removes the results of an earlier one. Every grid point's config is
composed and checked before the first run: a bad key or value is one line naming the variant (exit 2).
A SIGTERM to the tool reaches the running train.py, which saves its resume point; the tool then stops
(exit 143), and the same command continues the ablation; so does Ctrl-C (exit 130), which the
terminal sends to train.py too (a SIGINT to the tool alone stops it when its train.py ends; one that
it ignores, as a background job does, is ignored).
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from timerefine.pipeline.ablation import HEADLINE, markdown_table, plot, run_row, summarize, write_csv
from timerefine.pipeline.arguments import OneLineParser
from timerefine.pipeline.config import ConfigError, load_config, override_key, quoted
from timerefine.pipeline.errors import INTERRUPTED, STOPPED_BY_SIGTERM
from timerefine.pipeline.init_from_run import train_config
from timerefine.pipeline.previous_run import continued_checkpoint, finished, may_train
from timerefine.pipeline.resume import CheckpointError
from timerefine.tools.sbatch_template import expand_sweep

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ("results.csv", "results.md", "results.png")
# Keys the tool sets for each run, after the user's overrides, and where the user gives them.
OWNED = {"seed": "--seeds", "output_dir": "--out"}


def check_not_owned(overrides: list[str], where: str) -> None:
    """ValueError naming ``where`` for an override of an :data:`OWNED` key, which the tool's own value
    would silently replace."""
    for item in overrides:
        if (key := override_key(item)) in OWNED:
            raise ValueError(f"{where}: {item} is set by the tool for each run; use {OWNED[key]}")


def check_no_options(overrides: list[str]) -> None:
    """ValueError for an option of this tool given after ``--``, where it would be read as an override."""
    if options := [item for item in overrides if item.startswith("-")]:
        raise ValueError(
            f"after --: {' '.join(options)}: the tool's options go before --; after it, overrides"
        )


def check_keys_once(overrides: list[str], where: str) -> None:
    """ValueError naming ``where`` for a key given twice, whose last value would silently win."""
    keys = [override_key(item) for item in overrides]
    if twice := sorted({key for key in keys if keys.count(key) > 1}):
        raise ValueError(f"{where}: {', '.join(twice)} given twice; give each key once")


def variants(specs: list[str]) -> dict[str, list[str]]:
    """``name=overrides`` specs (overrides split as a shell splits them), comma lists expanded
    (``name[key=value]`` per expansion, a ``/`` in a value written ``%2F``: one folder). ValueError
    for a spec without a name, a name that is no folder name or a report's, a name or a key given twice, or
    overrides a shell would not split."""
    result: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, text = spec.partition("=")
        if not sep or not name:
            raise ValueError(f'--variant needs NAME="overrides", got {spec!r}')
        if "/" in name or name.startswith("."):
            raise ValueError(
                f"--variant {name}: a variant's name is its folder's, so no '/' and no leading '.'"
            )
        if name in RESULTS:
            raise ValueError(f"--variant {name}: a report's file name ({', '.join(RESULTS)}); give another")
        try:
            overrides = shlex.split(text)
        except ValueError as error:  # an unclosed quote
            raise ValueError(f"--variant {name}: {error} in {text!r}") from error
        check_not_owned(overrides, f"--variant {name}")
        check_keys_once(overrides, f"--variant {name}")
        expansions = expand_sweep(overrides)
        for combo in expansions:
            label = (
                name
                if len(expansions) == 1
                else f"{name}[{','.join(o for o in combo if o not in overrides)}]".replace("/", "%2F")
            )
            if label in result:
                raise ValueError(f"--variant {label}: given twice; each variant needs its own name")
            result[label] = combo
    return result


def check_grid(chosen: dict[str, list[str]], shared: list[str], out: Path, seeds: list[int] | None) -> None:
    """ValueError naming the variant whose config does not compose or check, or, for the ``seeds``
    to train (None: a report, which trains none), may not train (as train.py would refuse each of its
    runs, one by one); a variant started from another run (``init_from_run``, which may be an earlier
    variant's) is left to train.py."""
    for name, overrides in chosen.items():
        if any(item.lstrip("+").startswith("init_from_run=") for item in [*shared, *overrides]):
            continue
        if error := grid_error(shared, overrides, out / name, seeds):
            where = "after --" if error == grid_error(shared, [], out, seeds) else f"--variant {name}"
            raise ValueError(f"{where}: {error}")


def grid_error(shared: list[str], overrides: list[str], folder: Path, seeds: list[int] | None) -> str | None:
    """Why the config of ``shared`` and ``overrides`` does not load, or may not train in ``folder``'s
    run of one of ``seeds`` (a run begun so continues); None when it may."""
    try:
        for seed in seeds or [0]:
            cfg = load_config(run_overrides(shared, overrides, seed, folder / f"seed{seed}"))
            if seeds is not None:
                may_train(cfg)
    except ConfigError as error:
        return str(error)
    return None


def same_settings(chosen: dict[str, list[str]]) -> list[str]:
    """``B runs the same settings as A`` for each variant whose overrides repeat an earlier one's."""
    seen: dict[frozenset[str], str] = {}
    notes = []
    for name, overrides in chosen.items():
        if (first := seen.setdefault(frozenset(overrides), name)) != name:
            notes.append(f"--variant {name} runs the same settings as {first}")
    return notes


def run_overrides(shared: list[str], overrides: list[str], seed: int, run_dir: Path) -> list[str]:
    """One run's overrides; its folder quoted for Hydra, since a comma-list label holds ``[``, ``=``
    and ``]``."""
    return [*shared, *overrides, f"seed={seed}", f"output_dir={quoted(str(run_dir))}"]


def done(overrides: list[str], run_dir: Path) -> bool:
    """Whether ``run_dir`` holds the run of ``overrides`` finished with the same settings, as train.py
    composes them (``init_from_run``'s model settings inherited) and tests them; ConfigError for a
    config that does not load."""
    if not (run_dir / "metrics.json").is_file():
        return False
    cfg = train_config(overrides)
    try:  # resume=auto, the tool's: the folder's own (no checkpoint read)
        checkpoint = None if cfg.resume == "auto" else continued_checkpoint(cfg.resume, run_dir)
    except CheckpointError:  # train.py names it
        return False
    return finished(cfg, run_dir, checkpoint)


class Stopped(Exception):
    """A SIGTERM or Ctrl-C stopped the ablation; the run it reached saved its resume point."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def run_train(command: list[str]) -> int:
    """Run ``command`` (a train.py run) to its end and return its exit code; a SIGTERM meanwhile is
    passed on to it (which saves its resume point), and a Ctrl-C (SIGINT, which the terminal sends to
    it too) waited for, unless SIGINT is ignored (a background job); then raises :class:`Stopped`
    (SIGTERM's, if both came)."""
    signalled: list[int] = []
    children: list[subprocess.Popen] = []

    def pass_on(signum: int, frame: object) -> None:
        signalled.append(signum)
        for child in children:
            child.send_signal(signum)

    handlers = {signal.SIGTERM: pass_on, signal.SIGINT: lambda signum, frame: signalled.append(signum)}
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # the child inherits the ignoring
        del handlers[signal.SIGINT]
    # before the child starts: none runs on alone
    previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
    try:
        children.append(subprocess.Popen(command))  # in the caller's folder: relative paths are its
        if signal.SIGTERM in signalled:  # while it started
            children[0].send_signal(signal.SIGTERM)
        code = children[0].wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if signalled:
        raise Stopped(signal.SIGTERM if signal.SIGTERM in signalled else signalled[0])
    return code


def run_all(chosen: dict[str, list[str]], seeds: list[int], shared: list[str], out: Path) -> list[str]:
    """Run each variant x seed not finished with its settings; the folders of the runs that failed."""
    failed = []
    for name, overrides in chosen.items():
        for seed in seeds:
            run_dir = out / name / f"seed{seed}"
            run = run_overrides(shared, overrides, seed, run_dir)
            with contextlib.suppress(ConfigError):  # train.py reports it
                if done(run, run_dir):
                    print(f"[skip] {run_dir} is finished with these settings")
                    continue
            command = [sys.executable, str(ROOT / "train.py"), *run]
            print("[run]", shlex.join(command[1:]), flush=True)
            if run_train(command) != 0:
                print(f"[fail] {run_dir}: see its output above", file=sys.stderr)
                failed.append(str(run_dir))
    return failed


def finished_rows(
    chosen: dict[str, list[str]], seeds: list[int], shared: list[str], out: Path, failed: list[str]
) -> tuple[list[dict], dict[str, str]]:
    """The table rows of the variants x seeds finished with their settings, and the others' folders
    with why each is left out, named on stderr too (a failed one was already). ValueError for a
    metrics file that is not JSON."""
    rows, left_out = [], {}
    for name, overrides in chosen.items():
        for seed in seeds:
            run_dir = out / name / f"seed{seed}"
            try:
                if not done(run_overrides(shared, overrides, seed, run_dir), run_dir):
                    why = "no run finished with these settings"
                elif (row := run_row(name, seed, run_dir)).get(HEADLINE[-1]) is None:
                    why = "finished without test scores (test=false)"
                else:
                    rows.append(row)
                    continue
            except ConfigError as error:
                why = f"config error: {error}"
            if str(run_dir) in failed:
                why = "its run failed"
            else:
                print(f"[left out] {run_dir}: {why}", file=sys.stderr)
            left_out[str(run_dir)] = why
    return rows, left_out


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="ablation directory")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variant", action="append", default=[], help='NAME="override ..." (repeatable)')
    parser.add_argument("--report-only", action="store_true", help="only aggregate finished runs")
    parser.add_argument("shared", nargs="*", help="overrides for every run (after --)")
    args = parser.parse_args(argv)
    try:
        chosen = variants(args.variant)
        if not chosen:
            raise ValueError("--variant: none given; the report holds the variants x seeds given")
        check_no_options(args.shared)
        check_not_owned(args.shared, "after --")
        check_keys_once(args.shared, "after --")
        if twice := sorted({seed for seed in args.seeds if args.seeds.count(seed) > 1}):
            raise ValueError(f"--seeds: {', '.join(map(str, twice))} given twice")
        check_grid(chosen, args.shared, args.out, None if args.report_only else args.seeds)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for note in same_settings(chosen):
        print(f"note: {note}", file=sys.stderr)
    try:
        failed = [] if args.report_only else run_all(chosen, args.seeds, args.shared, args.out)
    except (Stopped, KeyboardInterrupt) as stop:  # KeyboardInterrupt: a Ctrl-C between runs
        by_sigterm = isinstance(stop, Stopped) and stop.signum == signal.SIGTERM
        how = "stopped by SIGTERM" if by_sigterm else "interrupted (Ctrl-C)"
        print(f"{how}: the same command continues the ablation", file=sys.stderr)
        return STOPPED_BY_SIGTERM if by_sigterm else INTERRUPTED
    if failed:
        print(f"error: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
    try:
        rows, left_out = finished_rows(chosen, args.seeds, args.shared, args.out, failed)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not rows:
        print(f"no finished runs under {args.out}", file=sys.stderr)
        if earlier := [name for name in RESULTS if (args.out / name).is_file()]:
            for name in earlier:
                (args.out / name).unlink()
            print(f"removed {', '.join(earlier)}: an earlier report's, of other runs", file=sys.stderr)
        return 1
    summary = summarize(rows)
    write_csv(rows, args.out / "results.csv")
    (args.out / "results.md").write_text(markdown_table(summary, left_out))
    plot(summary, args.out / "results.png")
    print(markdown_table(summary, left_out))
    print(f"wrote {args.out / 'results.csv'}, results.md and results.png")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
