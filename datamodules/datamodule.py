"""One LightningDataModule for every dataset: a source gives records and features per split."""

from __future__ import annotations

import logging
from functools import partial
from typing import Protocol

import lightning as L
from torch.utils.data import DataLoader

from datamodules.collate import CoarseLookup, GroundingCollator
from datamodules.dataset import GroundingDataset
from datamodules.records import FeatureStore, GroundingRecord
from datamodules.sampling import ShardedEpochSampler
from timerefine.answer_format.chat import chat_prompt
from timerefine.answer_format.codec import AnswerCodec
from timerefine.answer_format.prompts import resolve_template

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


class DataSource(Protocol):
    """Where a dataset's queries and features come from."""

    name: str
    num_frames: int
    feature_dim: int

    def records(self, split: str) -> list[GroundingRecord]: ...

    def store(self, split: str) -> FeatureStore: ...


class GroundingDataModule(L.LightningDataModule):
    """``prompt_template``: a name (``data.prompt_template``) or a template; ``chat_template``: how
    the prompt becomes the model's chat turn (timerefine/answer_format/chat.py)."""

    def __init__(
        self,
        source: DataSource,
        batch_size: int = 32,
        eval_batch_size: int = 100,
        num_workers: int = 0,
        seed: int = 0,
        prompt_template: str = "default",
        chat_template: str = "none",
    ) -> None:
        super().__init__()
        self.source, self.batch_size, self.eval_batch_size = source, batch_size, eval_batch_size
        self.num_workers, self.seed = num_workers, seed
        self.prompt_template, self.chat_template = resolve_template(prompt_template), chat_template
        self.datasets: dict[str, GroundingDataset] = {}
        self.collator: GroundingCollator | None = None

    def records(self, split: str) -> list[GroundingRecord]:
        if split not in self.datasets:
            self.datasets[split] = GroundingDataset(self.source.records(split), self.source.store(split))
        return self.datasets[split].records

    def attach(
        self, codec: AnswerCodec, video_tokens: int | None = None, coarse_lookup: CoarseLookup | None = None
    ) -> None:
        """Give the datamodule the model's answer codec (its tokenizer and the refinement schedule of
        the targets) and the number of video tokens a prompt holds (default: one per frame)."""
        self.collator = GroundingCollator(
            codec,
            partial(chat_prompt, self.prompt_template, self.chat_template, codec.tokenizer),
            video_tokens or self.source.num_frames,
            self.seed,
            coarse_lookup,
        )

    def annotated(self, split: str) -> int:
        """Queries the annotations hold for ``split``, before any were skipped for bad features."""
        reports = getattr(self.source, "coverage", {})
        return reports[split].total if split in reports else len(self.records(split))

    def coverage(self, metrics: dict[str, float]) -> dict[str, float]:
        """Percent of each split's annotated queries that were evaluated, from ``<split>/queries``."""
        return {
            f"{split}/coverage": 100.0 * metrics[f"{split}/queries"] / max(self.annotated(split), 1)
            for split in ("val", "test")
            if f"{split}/queries" in metrics
        }

    def setup(self, stage: str | None = None) -> None:
        for split in SPLITS:
            if split not in self.datasets:
                log.info("%s %s: %d queries", self.source.name, split, len(self.records(split)))

    def _loader(self, split: str, shuffle: bool, batch_size: int, skip: int = 0) -> DataLoader:
        if self.collator is None:
            raise RuntimeError("call attach(codec) before asking for dataloaders")
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        sampler = ShardedEpochSampler(len(self.records(split)), shuffle, self.seed, rank, world, skip)
        if self.trainer is not None:
            sampler.epoch = self.trainer.current_epoch
        return DataLoader(
            self.datasets[split],
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=self.collator,
            num_workers=self.num_workers,
            persistent_workers=False,
        )

    def train_dataloader(self) -> DataLoader:
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.completed if self.trainer else 0
        if done:
            log.info("resuming mid-epoch: skipping the %d batches this epoch already trained on", done)
        return self._loader("train", True, self.batch_size, skip=done * self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size)
