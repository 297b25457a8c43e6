"""Train a Video LLM for temporal grounding, test its best checkpoint, and write the run's outputs.

python train.py                                   # TimeRefine on the built-in dataset
python train.py model=direct trainer.max_steps=200 seed=3 output_dir=runs/x
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import lightning as L
from omegaconf import DictConfig

from grounding.metrics.prior import prior_scores
from timerefine.pipeline.build import build_datamodule, build_module, build_trainer
from timerefine.pipeline.config import ConfigError, load_config
from timerefine.pipeline.conventions import recorded_conventions
from timerefine.pipeline.errors import INPUT_ERRORS
from timerefine.pipeline.init_from_run import inherit_settings
from timerefine.pipeline.outputs import print_summary, save_config, scores, write_metrics
from timerefine.pipeline.resume import resume_checkpoint

log = logging.getLogger("train")


def run(cfg: DictConfig) -> dict[str, float]:
    """Fit, test the best checkpoint, and return the flat metrics written to metrics.json."""
    output_dir = Path(cfg.output_dir)
    checkpoint = resume_checkpoint(cfg.resume, output_dir)  # checked before anything is written
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    datamodule.setup()  # read and check every split before anything is written
    module = build_module(cfg, datamodule, tokenizer_dir=output_dir / "tokenizer")
    trainer = build_trainer(cfg, output_dir, module)
    if trainer.is_global_zero:
        save_config(cfg, output_dir)
        module.tokenizer.save_pretrained(output_dir / "tokenizer")

    trainer.fit(module, datamodule=datamodule, ckpt_path=checkpoint)
    if any(getattr(callback, "requeued", False) for callback in trainer.callbacks):
        log.info("stopped for a SLURM requeue at step %d; the requeued job resumes", trainer.global_step)
        return {}
    metrics: dict[str, float] = {"global_step": trainer.global_step}
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    evaluated = best or None
    if trainer.limit_val_batches:
        metrics |= scores(trainer.validate(module, datamodule=datamodule, ckpt_path=evaluated, verbose=False))
    if cfg.test:
        metrics |= scores(trainer.test(module, datamodule=datamodule, ckpt_path=evaluated, verbose=False))
        metrics |= {
            f"prior/{k}": v
            for k, v in prior_scores(datamodule.records("train"), datamodule.records("test")).items()
        }
    metrics |= datamodule.coverage(metrics) | recorded_conventions(cfg)
    if trainer.is_global_zero:
        write_metrics(metrics, output_dir)
        print_summary(metrics, output_dir)
    return metrics


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = inherit_settings(load_config(argv), argv)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    try:
        run(cfg)
    except INPUT_ERRORS as error:  # bad data or settings: the message names the file/key, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
