"""The training progress bar of a step-bounded run (max_epochs=-1) counts steps, not a bogus epoch total,
and shows the logged metrics without the loggers' version (``v_num``)."""

from __future__ import annotations

import io

import lightning as L
import pytest
from lightning.pytorch.callbacks import Callback, ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.demos.boring_classes import BoringModel
from omegaconf import OmegaConf

from callbacks.progress import progress_bar
from timerefine.pipeline.build import build_callbacks, build_loggers
from timerefine.pipeline.config import load_config


def train_description(bar: ProgressBar) -> str:
    if isinstance(bar, RichProgressBar):
        return next(t.description for t in bar.progress.tasks if t.id == bar.train_progress_bar_id)
    return bar.train_progress_bar.desc


def project_bar(kind: str, tmp_path) -> ProgressBar:
    cfg = load_config(
        [f"callbacks.progress_bar={kind}", "trainer.max_steps=3", "model.saliency.projector_steps=0"]
    )
    return next(
        c
        for c in build_callbacks(cfg, tmp_path, OmegaConf.to_object(cfg.model.refine))
        if isinstance(c, ProgressBar)
    )


@pytest.mark.parametrize("kind", ["rich", "tqdm"])
def test_progress_bar_counts_steps(kind, tmp_path):
    bar = project_bar(kind, tmp_path)
    seen: list[str] = []

    class Record(Callback):
        def on_train_batch_end(self, *_) -> None:
            seen.append(train_description(bar))

    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        max_epochs=-1,
        callbacks=[bar, Record()],
        logger=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(BoringModel())
    assert [d.strip().rstrip(":") for d in seen] == [
        "Epoch 0, step 1/3",
        "Epoch 0, step 2/3",
        "Epoch 0, step 3/3",
    ]


class LossOnBar(BoringModel):
    def training_step(self, batch, batch_idx):
        output = super().training_step(batch, batch_idx)
        self.log("train/loss", output["loss"], prog_bar=True)
        return output


@pytest.mark.parametrize("kind", ["rich", "tqdm"])
def test_progress_bar_shows_the_losses_without_the_version(kind, tmp_path):
    # With the run's loggers (versions "csv" and "tensorboard"), Lightning adds v_num "oard".
    bar = project_bar(kind, tmp_path)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        callbacks=[bar],
        logger=build_loggers(load_config([]), tmp_path),
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(LossOnBar())
    assert set(bar.get_metrics(trainer, trainer.lightning_module)) == {"train/loss"}


class Stream(io.StringIO):
    def __init__(self, terminal: bool) -> None:
        super().__init__()
        self.terminal = terminal

    def isatty(self) -> bool:
        return self.terminal


@pytest.mark.parametrize(("terminal", "expected"), [(True, RichProgressBar), (False, TQDMProgressBar)])
def test_the_default_bar_is_rich_on_a_terminal_and_tqdm_in_a_log(terminal, expected):
    # Rich writes nothing into a file or a SLURM .out until the run ends; tqdm does.
    assert load_config([]).callbacks.progress_bar == "auto"
    assert isinstance(progress_bar("auto", Stream(terminal)), expected)
    assert progress_bar("none", Stream(terminal)) is None
