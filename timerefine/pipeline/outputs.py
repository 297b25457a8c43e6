"""Run outputs: the saved config, ``metrics.json`` and the closing table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from grounding.metrics.iou import THRESHOLDS
from grounding.metrics.protocols import PROTOCOLS
from timerefine.pipeline.resume import trainer_state
from timerefine.pipeline.whole_files import write_whole

HEADLINE = (*(f"R1@{t}" for t in THRESHOLDS), "mIoU")
SPLITS = ("prior", "best_action", "val", "test")  # the summary's rows


def save_config(cfg: DictConfig, output_dir: Path) -> None:
    """``config.yaml``, whole or not at all: the run's other processes may be reading it
    (:func:`~timerefine.pipeline.previous_run.check_same_settings`)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    write_whole(output_dir / "config.yaml", OmegaConf.to_yaml(cfg))


def scored_weights(
    checkpoint: str | Path | None, run_dir: Path, final_step: int | None = None
) -> dict[str, str | int | None]:
    """The ``metrics.json`` entries naming the weights scored: a checkpoint file (relative to ``run_dir``
    when in it, so a moved or copied run still names it) and the step it holds, or (None) the fit's
    final weights at ``final_step``."""
    if not checkpoint:
        return {"checkpoint": "final weights", "checkpoint/step": final_step}
    path, folder = Path(checkpoint).resolve(), run_dir.resolve()
    return {
        "checkpoint": str(path.relative_to(folder) if path.is_relative_to(folder) else path),
        "checkpoint/step": int(trainer_state(path)["global_step"]),
    }


def scores(results: list[dict[str, float]]) -> dict[str, float]:
    """The flat metrics of ``trainer.validate`` / ``trainer.test`` results."""
    return {key: float(value) for result in results for key, value in result.items()}


def clean_number(value: float) -> float | None:
    """A float32 value as its shortest decimal (95.19999694824219 -> 95.2), NaN as None; a value no
    float32 holds (float64 arithmetic) is kept whole."""
    if math.isnan(value):
        return None
    single = np.float32(value)
    return float(str(single)) if float(single) == value else value


def write_metrics(metrics: dict[str, float], output_dir: Path) -> Path:
    """Flat ``metrics.json`` (percent values), keys sorted, floats without float32 noise; whole or not
    at all (a run that has one is finished: a part left by a kill would end it)."""
    path = output_dir / "metrics.json"
    clean = {k: (clean_number(v) if isinstance(v, float) else v) for k, v in sorted(metrics.items())}
    write_whole(path, json.dumps(clean, indent=2) + "\n")
    return path


def print_summary(metrics: dict[str, float], output_dir: Path, final: str = "last") -> None:
    """The scores table, then warnings; ``final``: ``model.inference.final``, which says whether the aux
    head answers what the text leaves unparsed."""
    table = Table(title="Temporal grounding results (%)")
    table.add_column("split")
    columns = (*HEADLINE, "parse_fail", "coverage")
    for name in columns:
        table.add_column(name, justify="right")
    for split in SPLITS:
        if f"{split}/mIoU" in metrics:
            cells = [f"{metrics[f'{split}/{n}']:.2f}" if f"{split}/{n}" in metrics else "-" for n in columns]
            table.add_row(split, *cells)
    console = Console(markup=False)  # a path or a message may hold brackets: [model.refine.steps=2]
    console.print(table)
    protocol = PROTOCOLS.get(str(metrics.get("eval/protocol")))
    fate = "is left out of the scores" if protocol and protocol.parsed_only else "counts as IoU 0"
    scored = f"each {fate}"
    if final != "last":
        scored = f"model.inference.final={final} answers those that reached an <OFFSET>; each other {fate}"
    for split in SPLITS:
        if failed := metrics.get(f"{split}/parse_fail"):
            console.print(
                f"warning: {round(failed, 2):g} % of the {split} answers could not be parsed; {scored}"
            )
    if "test/mIoU" in metrics and "prior/mIoU" in metrics:
        gain = metrics["test/mIoU"] - metrics["prior/mIoU"]
        console.print(
            f"test mIoU {metrics['test/mIoU']:.2f} vs best constant segment {metrics['prior/mIoU']:.2f} ({gain:+.2f})"
        )
    if protocol is not None and protocol.warning:
        console.print(f"warning: {protocol.warning}")
    console.print(f"run directory: {output_dir.resolve()}", soft_wrap=True)  # whole, to copy
