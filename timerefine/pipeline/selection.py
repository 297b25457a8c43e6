"""Whether a run chooses the checkpoint it tests on test queries: Charades-STA (and QVHighlights) have
no separate validation split, so their configs validate on the tested one."""

from __future__ import annotations

from omegaconf import DictConfig

from datamodules.datamodule import GroundingDataModule


def chosen_on_test(cfg: DictConfig, datamodule: GroundingDataModule) -> str | None:
    """Why the tested checkpoint is chosen on test queries (a ``val/`` monitor, validation queries that
    are also test queries) and the test scores are optimistic; None when it is not."""
    callbacks = cfg.callbacks
    monitors = {
        "callbacks.checkpoint.monitor": callbacks.checkpoint.monitor,
        "callbacks.early_stopping.monitor": (callbacks.early_stopping or {}).get("monitor"),
    }
    chosen = [f"{key}={value}" for key, value in monitors.items() if value and value.startswith("val/")]
    if not cfg.test or not chosen or cfg.trainer.max_steps == 0:  # max_steps=0: no fit, nothing chosen
        return None
    test = {(r.video_id, r.query, r.start, r.end) for r in datamodule.records("test")}
    shared = sum((r.video_id, r.query, r.start, r.end) in test for r in datamodule.records("val"))
    if not shared:
        return None
    return (
        f"{shared} validation queries are test queries (data.source.splits.val: "
        f"{cfg.data.source.get('splits', {}).get('val', 'val')}), and {' and '.join(chosen)} chooses "
        "the tested checkpoint on them, so the test scores are optimistic: set "
        "callbacks.checkpoint.monitor=null to test the last checkpoint, or validate on another split"
    )
