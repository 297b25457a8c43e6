"""One LightningDataModule for every dataset: a source gives records and features per split."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from typing import Any, Protocol

import lightning as L
from torch.utils.data import DataLoader

from datamodules.collate import GroundingCollator
from datamodules.consistency import consistency_warnings
from datamodules.dataset import GroundingDataset
from datamodules.quirks import QuirkError
from datamodules.sampling import EvaluationSampler, ResumableLoader, ShardedEpochSampler
from grounding.answer_format.chat import chat_prompt
from grounding.answer_format.codec import AnswerCodec
from grounding.answer_format.prompts import query_length_error
from grounding.answer_format.timeline import Timeline
from grounding.records import EmptySplitError, FeatureStore, GroundingRecord

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
TOO_LONG = ("error", "drop")


class DataSource(Protocol):
    """Where a dataset's queries and features come from."""

    name: str
    num_frames: int
    feature_dim: int

    def records(self, split: str) -> list[GroundingRecord]: ...

    def store(self, split: str) -> FeatureStore: ...


class GroundingDataModule(L.LightningDataModule):
    """``codec`` (shared with the module) holds the tokenizer and the refinement schedule of the
    targets; a prompt holds ``video_tokens`` video tokens, each after its ``video_stamps`` ids if
    given (its timestamp). ``prompt_template``: a template;
    ``chat_template``: how the prompt becomes the model's chat turn (grounding/answer_format/chat.py).
    ``coarse_guesses`` holds the model's own coarse segments by qid (callbacks/on_policy.py); the
    collator starts a target from one with probability ``on_policy_fraction``. Every query read must
    fit the LM's ``max_positions`` (None: no limit) with its prompt and the ``answer_tokens`` an answer
    may take; ``query_too_long``: one that does not is an ``error`` naming its ``file:line``, or
    (``drop``) a skip counted in the split's coverage and logged."""

    def __init__(
        self,
        source: DataSource,
        codec: AnswerCodec,
        *,
        video_tokens: int,
        video_stamps: Sequence[Sequence[int]] | None = None,
        batch_size: int,
        eval_batch_size: int,
        num_workers: int,
        seed: int,
        prompt_template: str,
        timeline: Timeline,
        chat_template: str,
        on_policy_fraction: float = 0.0,
        max_positions: int | None = None,
        answer_tokens: int = 0,
        query_too_long: str = "error",
    ) -> None:
        """The batch sizes, workers and prompt come from the ``data`` config (``DataConfig``)."""
        super().__init__()
        self.source, self.batch_size, self.eval_batch_size = source, batch_size, eval_batch_size
        self.num_workers, self.seed, self.timeline = num_workers, seed, timeline
        self.prompt_template, self.chat_template = prompt_template, chat_template
        self.datasets: dict[str, GroundingDataset] = {}
        self.codec = codec
        self.coarse_guesses: dict[str, tuple[int, int]] = {}
        self.collator = GroundingCollator(
            codec,
            partial(chat_prompt, prompt_template, chat_template, codec.tokenizer),
            video_tokens,
            seed,
            self.coarse_guesses.get if on_policy_fraction > 0 else None,
            timeline,
            on_policy_fraction,
            video_stamps,
        )
        self.max_positions, self.answer_tokens, self.query_too_long = (
            max_positions,
            answer_tokens,
            query_too_long,
        )
        self.too_long: dict[str, int] = {}  # queries skipped per split by data.query_too_long=drop

    def records(self, split: str) -> list[GroundingRecord]:
        if split not in self.datasets:
            self.datasets[split] = GroundingDataset(self.source.records(split), self.source.store(split))
            self._keep_fitting(split)
        return self.datasets[split].records

    def _keep_fitting(self, split: str) -> None:
        """Keep the split's queries that fit the LM with their prompt and answer, as ``query_too_long``
        says: an error naming the first that does not, or a logged and counted skip."""
        if self.max_positions is None:
            return
        dataset, rest = self.datasets[split], len(self.collator.prompt_ids(""))
        problems = [
            query_length_error(
                len(self.collator.prompt_ids(record.query)) - rest,
                rest + self.answer_tokens,
                self.max_positions,
            )
            for record in dataset.records
        ]
        skipped = [(r, p) for r, p in zip(dataset.records, problems, strict=True) if p]
        if not skipped:
            return
        record, problem = skipped[0]
        where = record.where or f"{self.source.name} {split} query {record.qid}"
        example = f"{where}: query too long: {problem}"
        if self.query_too_long == "error":
            raise QuirkError(f"{example}; data.query_too_long=drop skips such queries")
        kept = [r for r, p in zip(dataset.records, problems, strict=True) if not p]
        log.warning(
            "%s %s: %d of %d queries skipped, e.g. %s",
            *(self.source.name, split, len(skipped), len(dataset.records), example),
        )
        if not kept:
            raise EmptySplitError(f"{self.source.name} {split}: every query is too long, e.g. {example}")
        self.datasets[split] = GroundingDataset(kept, dataset.store)
        self.too_long[split] = self.too_long.get(split, 0) + len(skipped)

    def annotated(self, split: str) -> int:
        """Queries the annotations hold for ``split``, before any were skipped (bad features, too long)."""
        reports = getattr(self.source, "coverage", {})
        if split in reports:
            return reports[split].total
        return len(self.records(split)) + self.too_long.get(split, 0)

    def coverage(self, metrics: dict[str, float]) -> dict[str, float]:
        """Percent of each split's annotated queries that were evaluated, from ``<split>/queries``."""
        return {
            f"{split}/coverage": 100.0 * metrics[f"{split}/queries"] / max(self.annotated(split), 1)
            for split in ("val", "test")
            if f"{split}/queries" in metrics
        }

    def setup(self, stage: str | None = None) -> None:
        """Read every split (once), then warn of what only the splits together show."""
        if all(split in self.datasets for split in SPLITS):
            return
        for split in SPLITS:
            log.info("%s %s: %d queries", self.source.name, split, len(self.records(split)))
        for warning in consistency_warnings(self.source.name, {s: self.records(s) for s in SPLITS}):
            log.warning(warning)

    def _rank_and_world(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)

    def _loader_options(self) -> dict[str, Any]:
        return {"collate_fn": self.collator, "num_workers": self.num_workers}

    def train_dataloader(self) -> ResumableLoader:
        """Resumes mid-epoch through its ``state_dict``, which Lightning checkpoints."""
        sampler = ShardedEpochSampler(len(self.records("train")), True, self.seed, *self._rank_and_world())
        if self.trainer is not None:
            sampler.epoch = self.trainer.current_epoch
        return ResumableLoader(
            self.datasets["train"], sampler, batch_size=self.batch_size, **self._loader_options()
        )

    def _evaluation_loader(self, split: str) -> DataLoader:
        sampler = EvaluationSampler(len(self.records(split)), *self._rank_and_world())
        return DataLoader(
            self.datasets[split], self.eval_batch_size, sampler=sampler, **self._loader_options()
        )

    def val_dataloader(self) -> DataLoader:
        return self._evaluation_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._evaluation_loader("test")
