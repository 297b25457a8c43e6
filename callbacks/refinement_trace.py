"""Draw the refinement at each validation: the truth against every step's segment for a fixed set of
validation queries, next to the validation mIoU of each step.

Saved as ``<run>/refinement_trace/step<N>.png`` and logged to TensorBoard (``val/refinement_trace``).
Every rank decodes the same queries (a sharded model needs all ranks in each forward pass); rank 0
draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from callbacks.lightning_compat import as_a_step
from grounding.answer_format.predictions import seconds

Segment = tuple[float, float]


@dataclass(frozen=True)
class Trace:
    """One query's truth and its segment at each refinement step (seconds)."""

    query: str
    duration: float
    truth: Segment
    steps: list[Segment]


def step_name(index: int) -> str:
    return "coarse" if index == 0 else f"step {index}"


def trace_figure(traces: list[Trace], step_miou: list[float], global_step: int) -> Figure:
    """One panel per query (truth on top, then each step), and the mIoU of each step."""
    figure = Figure(figsize=(11, 1.0 + 1.3 * len(traces)), dpi=90)
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(max(len(traces), 1), 2, width_ratios=(3, 1))
    for row, trace in enumerate(traces):
        axes = figure.add_subplot(grid[row, 0])
        labels = ["truth", *(step_name(i) for i in range(len(trace.steps)))]
        for y, (segment, colour) in enumerate(
            [
                (trace.truth, "#2e7d32"),
                *(
                    (s, "#1565c0" if i == len(trace.steps) - 1 else "#90a4ae")
                    for i, s in enumerate(trace.steps)
                ),
            ]
        ):
            if not any(math.isnan(x) for x in segment):
                axes.barh(y, segment[1] - segment[0], left=segment[0], height=0.7, color=colour)
        axes.set_yticks(range(len(labels)), labels, fontsize=7)
        axes.invert_yaxis()
        axes.set_xlim(0, trace.duration)
        axes.set_title(trace.query[:90], fontsize=8, loc="left")
        axes.tick_params(axis="x", labelsize=7)
    if traces:
        axes.set_xlabel("seconds", fontsize=7)
    bars = figure.add_subplot(grid[:, 1])
    bars.bar([step_name(i) for i in range(len(step_miou))], step_miou, color="#1565c0")
    bars.set_ylabel("val mIoU (%)")
    bars.set_title(f"mIoU per refinement step, step {global_step}", fontsize=9)
    bars.tick_params(axis="x", labelsize=7, rotation=45)
    figure.tight_layout()
    return figure


class RefinementTrace(L.Callback):
    """Draws the first ``num_queries`` validation queries at every validation during fitting."""

    def __init__(self, directory: Path, num_queries: int) -> None:
        self.directory, self.num_queries = Path(directory), num_queries

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        datamodule = trainer.datamodule
        dataset = datamodule.datasets["val"]
        items = [dataset[(0, i)] for i in range(min(self.num_queries, len(dataset)))]
        if not items:
            return
        batch = pl_module.transfer_batch_to_device(datamodule.evaluation_collator(items), pl_module.device, 0)
        training = pl_module.training
        pl_module.eval()
        predictions = as_a_step(trainer, pl_module, "predict_batch", batch)  # on every rank (FSDP)
        pl_module.train(training)
        if not trainer.is_global_zero:
            return
        traces = [
            Trace(r.query, r.duration, (r.start, r.end), [seconds(s, r.duration) for s in p.segments])
            for r, p in zip(batch["records"], predictions, strict=True)
        ]
        metrics = trainer.callback_metrics
        step_miou = [
            float(metrics[f"val/step{i}/mIoU"])
            for i in range(pl_module.codec.schedule.num_segments)
            if f"val/step{i}/mIoU" in metrics
        ]
        figure = trace_figure(traces, step_miou, trainer.global_step)
        self.directory.mkdir(parents=True, exist_ok=True)
        figure.savefig(self.directory / f"step{trainer.global_step:06d}.png")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure("val/refinement_trace", figure, trainer.global_step, close=False)
