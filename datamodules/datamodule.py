"""One LightningDataModule for every dataset: a source gives records and features per split."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import lightning as L
from torch.utils.data import DataLoader

from datamodules.collate import GroundingCollator, Opaque
from datamodules.consistency import consistency_warnings
from datamodules.dataset import GroundingDataset
from datamodules.quirks import QuirkError
from datamodules.sampling import EvaluationSampler, ResumableLoader, ShardedEpochSampler
from grounding.answer_format.chat import CHAT_TEMPLATES, chat_prompt
from grounding.answer_format.codec import AnswerCodec
from grounding.answer_format.prompts import query_length_error, resolve_template, template_error
from grounding.answer_format.timeline import DEFAULT_TIMELINE, TIMELINES, timeline_named
from grounding.checks import Checked, checked, integer, one_of, optional
from grounding.records import EmptySplitError, FeatureStore, GroundingRecord

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}  # Lightning's stages
TOO_LONG = ("error", "drop")


class DataSource(Protocol):
    """Where a dataset's queries and features come from."""

    name: str
    num_frames: int
    feature_dim: int

    def records(self, split: str) -> list[GroundingRecord]: ...

    def annotations(self, split: str) -> list[GroundingRecord]:
        """The split's annotated queries, their features not read (the query-free baselines need none)."""
        ...

    def store(self, split: str) -> FeatureStore: ...


@dataclass
class DataSpec(Checked):
    """The ``data`` node: the keys every dataset shares. ``name`` picks the loader
    (datamodules/annotation_source.py LOADERS; ``builtin``: generated), ``source`` is the dataset's own
    spec. With ``global_batch_size`` set, gradient accumulation = global_batch_size / (batch_size x
    devices x nodes). ``timeline``: what the answers' frame indices mean
    (grounding/answer_format/timeline.py). ``prompt_template``: a name from ``PROMPTS`` or a template
    (grounding/answer_format/prompts.py); ``chat_template``: how the prompt becomes the model's chat
    turn, none, tokenizer or a named one (grounding/answer_format/chat.py). ``query_too_long``: a query
    whose prompt, video tokens and answer exceed the LM's positions stops the run naming its
    ``file:line`` (``error``) or is skipped, counted in the coverage and logged (``drop``)."""

    name: str
    source: Any
    batch_size: int = checked(32, integer(1))
    eval_batch_size: int = checked(100, integer(1))
    global_batch_size: int | None = checked(None, optional(integer(1)))
    num_workers: int = checked(0, integer(0))
    prompt_template: str = checked("default", template_error)
    chat_template: str = checked("none", one_of(*CHAT_TEMPLATES))
    timeline: str = checked(DEFAULT_TIMELINE.name, one_of(*TIMELINES))
    query_too_long: str = checked("error", one_of(*TOO_LONG))


def uncollated(items: list[dict[str, Any]]) -> Opaque[dict[str, Any]]:
    """The training loader's ``collate_fn`` under on-policy refinement: the items, held as they are."""
    return Opaque(items)


class GroundingDataModule(L.LightningDataModule):
    """The batches of ``data`` (a :class:`DataSpec`) read from ``source``. ``codec`` (shared with the
    module) holds the tokenizer and the refinement schedule of the targets; a prompt holds
    ``video_tokens`` video tokens, each after its ``video_stamps`` ids if given (its timestamp).
    ``coarse_guesses`` holds the model's own coarse segments by qid (callbacks/on_policy.py); the
    collator starts a target from one with probability ``on_policy_fraction``. The guesses change
    between steps in the main process, out of the loader workers' sight, so with them the training
    loader hands out the items uncollated and ``on_before_batch_transfer`` collates them in the main
    process right before each step, whatever ``data.num_workers``. Every query read must
    fit the LM's ``max_positions`` (None: no limit) with its prompt and the ``answer_tokens`` an answer
    may take, or is handled as ``data.query_too_long`` says."""

    def __init__(
        self,
        source: DataSource,
        codec: AnswerCodec,
        data: DataSpec,
        *,
        video_tokens: int,
        seed: int,
        video_stamps: Sequence[Sequence[int]] | None = None,
        on_policy_fraction: float = 0.0,
        max_positions: int | None = None,
        answer_tokens: int = 0,
    ) -> None:
        super().__init__()
        self.source, self.codec, self.data, self.seed = source, codec, data, seed
        self.prompt_template, self.timeline = (
            resolve_template(data.prompt_template),
            timeline_named(data.timeline),
        )
        self.datasets: dict[str, GroundingDataset] = {}
        self.coarse_guesses: dict[str, tuple[int, int]] = {}
        self.on_policy = on_policy_fraction > 0
        collator = partial(
            GroundingCollator,
            codec,
            partial(chat_prompt, self.prompt_template, data.chat_template, codec.tokenizer),
            video_tokens,
            seed,
            timeline=self.timeline,
            video_stamps=video_stamps,
        )
        lookup = self.coarse_guesses.get if self.on_policy else None
        self.collator = collator(coarse_lookup=lookup, on_policy_fraction=on_policy_fraction)
        self.evaluation_collator = collator()  # guesses are training queries': another split's qid may clash
        self.max_positions, self.answer_tokens = max_positions, answer_tokens
        self.too_long: dict[str, int] = {}  # queries skipped per split by data.query_too_long=drop

    def records(self, split: str) -> list[GroundingRecord]:
        if split not in self.datasets:
            self.datasets[split] = GroundingDataset(self.source.records(split), self.source.store(split))
            self._refuse_special_token_text(split)
            self._keep_fitting(split)
        return self.datasets[split].records

    def _refuse_special_token_text(self, split: str) -> None:
        """A QuirkError naming the first query of ``split`` that spells one of the tokenizer's special
        tokens, which its prompt would hold as that token."""
        for record in self.datasets[split].records:
            if reason := self.collator.special_token_error(record.query):
                where = record.where or f"{self.source.name} {split} query {record.qid}"
                raise QuirkError(f"{where}: {reason}")

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
        if self.data.query_too_long == "error":
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
        """Read the splits ``stage`` uses (once; every split without one), then warn of what only they
        and the training annotations together show. A test reads the test split and the training
        annotations, not their features: new test data needs no more."""
        splits = STAGE_SPLITS.get(stage or "", SPLITS)
        if all(split in self.datasets for split in splits):
            return
        for split in splits:
            log.info("%s %s: %d queries", self.source.name, split, len(self.records(split)))
        read = {"train": self.source.annotations("train")} | {s: self.records(s) for s in splits}
        for warning in consistency_warnings(self.source.name, read):
            log.warning(warning)

    def _rank_and_world(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)

    def _loader_options(self) -> dict[str, Any]:
        return {"collate_fn": self.collator, "num_workers": self.data.num_workers}

    def train_dataloader(self) -> ResumableLoader:
        """Resumes mid-epoch through its ``state_dict``, which Lightning checkpoints."""
        size, (rank, world) = len(self.records("train")), self._rank_and_world()
        sampler = ShardedEpochSampler(size, True, self.seed, rank, world, even=True)
        if size % world and rank == 0:
            log.info(
                "%s train: %d queries for %d processes: each epoch leaves out %d (others each epoch), so "
                "that every process takes as many batches",
                *(self.source.name, size, world, size % world),
            )
        if self.trainer is not None:
            sampler.epoch = self.trainer.current_epoch
        options = self._loader_options() | ({"collate_fn": uncollated} if self.on_policy else {})
        return ResumableLoader(self.datasets["train"], sampler, batch_size=self.data.batch_size, **options)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Collates the training items of on-policy refinement with the guesses as they are now (Lightning
        calls this in the main process after the previous step's ``on_train_batch_end``, the refresh);
        collated batches pass as they are."""
        if not isinstance(batch, Opaque):
            return batch
        collated = self.collator(list(batch))
        return self.trainer.precision_plugin.convert_input(collated) if self.trainer else collated

    def _evaluation_loader(self, split: str) -> DataLoader:
        sampler = EvaluationSampler(len(self.records(split)), *self._rank_and_world())
        return DataLoader(
            self.datasets[split],
            self.data.eval_batch_size,
            sampler=sampler,
            **self._loader_options() | {"collate_fn": self.evaluation_collator},
        )

    def val_dataloader(self) -> DataLoader:
        return self._evaluation_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._evaluation_loader("test")
