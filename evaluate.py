"""Evaluate a trained run's checkpoint, on any number of devices, without training.

    python evaluate.py runs/x                       # best checkpoint, test split
    python evaluate.py runs/x --ckpt last trainer.devices=2 trainer.strategy=ddp model.inference.final=aux

Writes ``<run>/eval/<name>/metrics.json`` and ``predictions/test.jsonl``; overrides apply on top
of the run's saved config.yaml (same checks as train.py).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import lightning as L
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from timerefine.pipeline.build import build_datamodule, build_module, build_trainer
from timerefine.pipeline.config import ConfigError, check_override_types
from timerefine.pipeline.outputs import print_summary, write_metrics


def checkpoint_path(run_dir: Path, ckpt: str) -> Path:
    if ckpt == "last":
        return run_dir / "checkpoints" / "last.ckpt"
    if ckpt == "best":
        found = sorted((run_dir / "checkpoints").glob("best-*.ckpt"))
        if not found:
            raise FileNotFoundError(f"no best-*.ckpt in {run_dir / 'checkpoints'}; try --ckpt last")
        return found[-1]
    return Path(ckpt)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--ckpt", default="best", help="best | last | a checkpoint path")
    parser.add_argument("--name", default="test", help="subdirectory of <run>/eval for the outputs")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)

    cfg = OmegaConf.load(args.run_dir / "config.yaml")
    try:
        check_override_types(cfg, args.overrides)
        OmegaConf.set_struct(cfg, True)
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(args.overrides))
    except (ConfigError, OmegaConfBaseException) as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    ckpt = checkpoint_path(args.run_dir, args.ckpt)
    if not ckpt.is_file():
        print(f"no checkpoint at {ckpt}", file=sys.stderr)
        return 2
    output_dir = args.run_dir / "eval" / args.name
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule, tokenizer_dir=args.run_dir / "tokenizer")
    trainer = build_trainer(cfg, output_dir, module)
    results = trainer.test(module, datamodule=datamodule, ckpt_path=str(ckpt), verbose=False)
    if trainer.is_global_zero:
        metrics = {key: float(value) for result in results for key, value in result.items()}
        write_metrics(metrics, output_dir)
        print_summary(metrics, output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
