"""Evaluate a trained run's checkpoint, on any number of devices, without training.

    python evaluate.py runs/x                       # best checkpoint, test split
    python evaluate.py runs/x --ckpt last trainer.devices=2 trainer.strategy=ddp model.inference.final=aux

Writes ``<run>/eval/<name>/metrics.json`` (with the baselines ``prior/*`` and ``best_action/*`` on the
queries tested, and the ``checkpoint`` scored with its ``checkpoint/step``), ``config.yaml`` (the config
evaluated) and ``predictions/test.jsonl``, replacing an earlier evaluation of that name; overrides
apply on top of the run's saved config.yaml (same checks as train.py; a saved key nothing reads is an
error too).
What the run was trained as cannot be overridden (timerefine/pipeline/run_identity.py): ``model.*``
but ``model.inference.*``, ``data.timeline``, ``data.prompt_template``, ``data.chat_template``,
``data.source.num_frames``, ``data.source.feature_dim`` and what the features mean
(``run_identity.feature_keys``: ``data.source.features`` but between folder and packed, and
``data.source.seed`` where the features are generated from it: built-in, synthetic, action traces).
Evaluation settings can: ``eval.protocol``, ``model.inference.*``, batch sizes, ``trainer.*`` (devices,
precision, ``limit_test_batches``) and where the data is (``data.source.root``, ``annotation_files``,
``splits``, ``feature_path``, quirks, ``multi_window``), e.g. another test split; but a ``feature_path``
whose ``encoder.json`` records another encoder than the run's folder's is refused. Training settings
(``run_identity.TRAINING_ONLY``: the fit's length, validation, checkpointing, ``grpo.*``,
``init_from_run``) are refused: an evaluation cannot change them. A checkpoint trained with another
tokenizer than the run's ``tokenizer/`` is refused too.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from grounding.checks import a_writable_folder
from timerefine.inference.video_features import InputError, encoder_change_error
from timerefine.pipeline.arguments import OneLineParser
from timerefine.pipeline.baselines import baseline_scores
from timerefine.pipeline.batch_limits import empty_loops
from timerefine.pipeline.best_checkpoint import checkpoint_path, fitting_checkpoint
from timerefine.pipeline.build import build_datamodule, build_module, build_trainer
from timerefine.pipeline.config import ConfigError, checked_values, composed_run_config, load_run_config
from timerefine.pipeline.conventions import recorded_conventions
from timerefine.pipeline.errors import INPUT_ERRORS
from timerefine.pipeline.outputs import print_summary, save_config, scored_weights, scores, write_metrics
from timerefine.pipeline.run_identity import identity_error, training_only_error

log = logging.getLogger("evaluate")
NO_LOGGERS = {"logger": {"csv": False, "tensorboard": False}}


def evaluate(cfg: DictConfig, run_dir: Path, ckpt: Path, output_dir: Path) -> dict[str, float]:
    """Test ``ckpt`` and write the flat metrics, with the test split's coverage and the query-free
    baselines on the queries it scored (``prior/*``, ``best_action/*``), as train.py does."""
    tokenizer = run_dir / "tokenizer"
    if not tokenizer.is_dir():  # a new one would give the checkpoint's token rows other meanings
        raise FileNotFoundError(f"{tokenizer}: missing (the run's tokenizer)")
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg, tokenizer_dir=tokenizer)
    module = build_module(cfg, datamodule, training=False)
    # trained otherwise than config.yaml says, unreadable, another tokenizer, unfit, other base: refused
    fitting_checkpoint(module, ckpt, tokenizer, weights=False)
    # its scores are metrics.json, which it replaces; loggers would append to an earlier evaluation's
    trainer = build_trainer(OmegaConf.merge(cfg, NO_LOGGERS), output_dir, module)
    if errors := list(empty_loops(trainer, datamodule, ("test",))):
        raise ConfigError("; ".join(errors))
    metrics = scores(trainer.test(module, datamodule=datamodule, ckpt_path=str(ckpt), verbose=False))
    metrics |= baseline_scores(cfg, trainer, datamodule)
    metrics |= datamodule.coverage(metrics) | recorded_conventions(cfg) | scored_weights(ckpt, run_dir)
    if trainer.is_global_zero:
        if (output_dir / "metrics.json").is_file():
            log.info("%s: replacing the evaluation there", output_dir)
        if (output_dir / "logs").is_dir():  # an evaluation's before 2026-12-06, of other scores
            shutil.rmtree(output_dir / "logs")
        save_config(cfg, output_dir)  # what was evaluated: the run's config with the overrides given
        write_metrics(metrics, output_dir)
        print_summary(metrics, output_dir, cfg.model.inference.final)
    return metrics


def folder_name(text: str) -> str:
    """An argparse type: one folder's name (``--name ../x`` would write outside the run's eval/)."""
    if not text or "/" in text or "\\" in text or text in (".", ".."):
        raise argparse.ArgumentTypeError(f"must be one folder's name inside <run>/eval, got {text!r}")
    return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--ckpt", default="best", help="best | last | a checkpoint path")
    parser.add_argument(
        "--name", default="test", type=folder_name, help="subdirectory of <run>/eval for the outputs"
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)

    config, output_dir = args.run_dir / "config.yaml", args.run_dir / "eval" / args.name
    if not config.is_file():
        print(f"error: no {config}: not a run directory", file=sys.stderr)
        return 2
    try:
        trained = load_run_config(args.run_dir, [])
    except ConfigError as error:
        print(f"config error: {error.of_file(config)}", file=sys.stderr)
        return 2
    try:
        cfg = composed_run_config(args.run_dir, args.overrides)  # what cannot change, then values
        if reason := (
            identity_error(trained, cfg)
            or training_only_error(trained, cfg)
            or encoder_change_error(trained, cfg)
        ):
            raise ConfigError(reason)
        checked_values(cfg)
    except (ConfigError, InputError) as error:  # InputError: an encoder record that cannot be read
        print(f"config error: {error}", file=sys.stderr)
        return 2
    try:
        ckpt = checkpoint_path(args.run_dir, args.ckpt)
        if reason := a_writable_folder(output_dir):
            raise FileExistsError(f"--name {args.name}: {reason}")
        rank_zero_only(print)(f"checkpoint: {ckpt}")
        evaluate(cfg, args.run_dir, ckpt, output_dir)
    except (*INPUT_ERRORS, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
