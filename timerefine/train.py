"""Train a Video LLM for temporal grounding, test its best checkpoint, and write the run's outputs.

python train.py                                   # TimeRefine on the built-in dataset
python train.py model=direct trainer.max_steps=800 seed=3 output_dir=runs/x   # 600 projector + 200 LM steps
python train.py --cfg job [overrides]             # print the composed config, run nothing
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from callbacks.best_checkpoint import BestCheckpoint
from callbacks.slurm_requeue import StoppedForRequeue, requeue_pending, requeue_stop
from callbacks.slurm_signal import REQUEUE_SIGNAL, requeue_at_once, requeue_outside_training
from grounding.checks import a_writable_folder
from timerefine.pipeline.baselines import baseline_scores
from timerefine.pipeline.batch_limits import empty_loops, partial_accumulation
from timerefine.pipeline.best_checkpoint import check_readable_best, check_resumed_best
from timerefine.pipeline.build import build_datamodule, build_module, build_trainer
from timerefine.pipeline.config import SWEEPS, ConfigError, group_options, idle_settings, quoted
from timerefine.pipeline.conventions import recorded_conventions
from timerefine.pipeline.errors import INPUT_ERRORS, INTERRUPTED, STOPPED_BY_SIGTERM
from timerefine.pipeline.init_from_run import train_config
from timerefine.pipeline.loggers import unlogged
from timerefine.pipeline.outputs import print_summary, save_config, scored_weights, scores, write_metrics
from timerefine.pipeline.previous_run import (
    carried_tokenizer,
    check_same_precision,
    check_same_settings,
    continued_checkpoint,
    finished,
    may_train,
)
from timerefine.pipeline.resume import CheckpointError, checkpoint_file, trainer_state
from timerefine.pipeline.run_identity import checkpoint_tokenizer_error
from timerefine.pipeline.selection import chosen_on_test

log = logging.getLogger("train")


def run(cfg: DictConfig) -> dict[str, float]:
    """Fit, test the best checkpoint, and return the flat metrics written to metrics.json (those
    already there when ``output_dir`` holds this run finished)."""
    output_dir = Path(cfg.output_dir)
    checkpoint = continued_checkpoint(cfg.resume, output_dir)  # checked before anything is written
    check_same_settings(cfg, output_dir, checkpoint)
    if finished(cfg, output_dir, checkpoint):
        log.info("%s holds this run finished (metrics.json): nothing to do", output_dir)
        return json.loads((output_dir / "metrics.json").read_text())
    if reason := a_writable_folder(str(output_dir)):  # found now, not once the data and model are loaded
        raise ConfigError(f"output_dir={output_dir}: {reason}")
    tokenizer_dir, carried, resumed = output_dir / "tokenizer", None, None
    if checkpoint is not None:
        resumed = checkpoint_file(checkpoint, output_dir)
        log.info("resuming from %s", resumed)
        state = trainer_state(resumed)  # mapped once, not read: the tokenizer it carries
        check_same_precision(cfg, resumed, state)  # after finished(): a finished run is done anywhere
        carried = carried_tokenizer(resumed, state, tokenizer_dir)
        if cfg.callbacks.checkpoint.monitor:  # without one the final weights are tested
            check_resumed_best(resumed, state, output_dir / "checkpoints")
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg, tokenizer_dir=tokenizer_dir, carried=carried)
    datamodule.setup()  # read and check every split before anything is written
    module = build_module(cfg, datamodule)
    if resumed is not None:  # refused before anything is written: other base weights, another tokenizer
        module.check_base(resumed)
        if carried is None and (
            reason := checkpoint_tokenizer_error(resumed, state, module.tokenizer, tokenizer_dir)
        ):  # restored from the checkpoint, it is the checkpoint's
            raise CheckpointError(reason)
    trainer = build_trainer(cfg, output_dir, module)
    if errors := list(empty_loops(trainer, datamodule)):
        raise ConfigError("; ".join(errors))
    if partial := partial_accumulation(trainer, datamodule):
        log.warning(partial)
    if on_test := chosen_on_test(cfg, datamodule):
        log.warning(on_test)
    if trainer.is_global_zero:
        (output_dir / "metrics.json").unlink(missing_ok=True)  # an earlier end's; written when this run ends
        save_config(cfg, output_dir)
        module.tokenizer.save_pretrained(tokenizer_dir)

    try:
        # the file (Lightning's own SLURM scan is off: callbacks.lightning_compat.without_hpc_scan)
        trainer.fit(module, datamodule=datamodule, ckpt_path=resumed)
    except SIGTERMException:
        if (requeue := requeue_stop(trainer.callbacks)) is None:
            raise
        raise requeue from None
    if requeue_pending(trainer.callbacks):  # no step boundary was left to act on it
        requeue_at_once(REQUEUE_SIGNAL, None)
    metrics: dict[str, float] = {"global_step": trainer.global_step}
    kept = [c.best_model_path for c in trainer.checkpoint_callbacks if isinstance(c, BestCheckpoint)]
    evaluated = (kept[0] or None) if kept and cfg.callbacks.checkpoint.monitor else None  # or final weights
    if evaluated:  # read at the end: gone unreadable since it was written
        check_readable_best(Path(evaluated), "this run")
    with unlogged(trainer):
        if trainer.limit_val_batches:
            metrics |= scores(
                trainer.validate(module, datamodule=datamodule, ckpt_path=evaluated, verbose=False)
            )
        if cfg.test:
            metrics |= scores(trainer.test(module, datamodule=datamodule, ckpt_path=evaluated, verbose=False))
            metrics |= baseline_scores(cfg, trainer, datamodule)
    metrics |= (
        datamodule.coverage(metrics)
        | recorded_conventions(cfg)
        | scored_weights(evaluated, output_dir, trainer.global_step)
    )
    if trainer.is_global_zero:
        write_metrics(metrics, output_dir)
        print_summary(metrics, output_dir, cfg.model.inference.final)
        if on_test:
            log.warning(on_test)  # again, beside the scores it concerns
    return metrics


def usage() -> str:
    """This module's docstring and the config groups with their options."""
    groups = "\n".join(f"  {group}: {', '.join(options)}" for group, options in group_options().items())
    return (
        f"{__doc__}\nConfig groups (group=option):\n{groups}\n\nThe composed config (key=value sets a key):"
    )


def stopped(cfg: DictConfig, how: str, code: int) -> int:
    """``code``, once rank zero has said how the run stopped and where it continues from."""
    last = Path(cfg.output_dir) / "checkpoints" / "last.ckpt"
    where = f"{last} is the resume point" if last.exists() else "no checkpoint yet; the run starts over"
    again = f"the same command with {folder_override(cfg.output_dir)} continues it"  # the default: a new one
    rank_zero_only(print)(f"{how}: {where}; {again}", file=sys.stderr)
    return code


def folder_override(output_dir: str) -> str:
    """``output_dir=<output_dir>`` as a shell passes it to Hydra: quoted for both where the folder holds
    more than letters, digits and ``_.:/-`` (timerefine-ablate's ``K[model.refine.steps=1]``)."""
    if re.fullmatch(r"[\w.:/-]+", output_dir):
        return f"output_dir={output_dir}"
    return shlex.quote(f"output_dir={quoted(output_dir)}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    requeue_outside_training()  # also as timerefine-train (train.py has set it before its imports)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    shown = [arg for arg in argv if arg in ("--help", "-h", "--cfg")]  # print the config, run nothing
    if "--cfg" in argv:
        if argv[argv.index("--cfg") + 1 :][:1] != ["job"]:
            print("config error: --cfg: train.py prints the job's config only: --cfg job", file=sys.stderr)
            return 2
        shown.append(argv[argv.index("--cfg") + 1])
    if multirun := {"--multirun", "-m"} & set(argv):
        print(f"config error: {multirun.pop()}: train.py runs one config; {SWEEPS}", file=sys.stderr)
        return 2
    try:
        overrides = [arg for arg in argv if arg not in shown]
        cfg = train_config(overrides)
        if (begun := may_train(cfg)) and not shown:
            rank_zero_only(log.warning)(begun)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    if shown:
        helping = {"--help", "-h"} & set(shown)
        print(f"{usage()}\n" if helping else "", OmegaConf.to_yaml(cfg), sep="", end="")
        return 0
    for idle in idle_settings(cfg, overrides):
        rank_zero_only(log.warning)(idle)
    try:
        run(cfg)
    except INPUT_ERRORS as error:  # bad data or settings: the message names the file/key, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    except SIGTERMException:  # Lightning's: a SystemExit whose code would say the run succeeded
        return stopped(cfg, "stopped by SIGTERM", STOPPED_BY_SIGTERM)
    except SystemExit as stop:  # Lightning's exit(1) after Ctrl-C, its shutdown done
        if not isinstance(stop.__context__, KeyboardInterrupt):
            raise
        return stopped(cfg, "interrupted (Ctrl-C)", INTERRUPTED)
    except StoppedForRequeue as requeue:  # logged by SlurmRequeue
        return requeue.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
