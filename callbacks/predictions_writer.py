"""Write one JSON line per test query to ``predictions/test.jsonl`` (gathered from every rank)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch.distributed as dist


class PredictionsWriter(L.Callback):
    """Also keeps the last test's ``qids`` on every rank: the queries a limited test scored."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.qids: set[str] = set()

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows = list(pl_module.predictions)
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            gathered: list[list[dict]] = [[] for _ in range(trainer.world_size)]
            dist.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
        self.qids = {row["qid"] for row in rows}
        if trainer.is_global_zero:
            self.directory.mkdir(parents=True, exist_ok=True)
            rows.sort(key=lambda row: row["qid"])
            with open(self.directory / "test.jsonl", "w") as out:
                out.writelines(json.dumps(row) + "\n" for row in rows)
