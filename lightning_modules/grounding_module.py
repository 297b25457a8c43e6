"""The LightningModule: LM cross-entropy + lambda x aux loss, greedy evaluation, grounding metrics."""

from __future__ import annotations

import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch.distributed.fsdp import FullyShardedDataParallel

from grounding.answer_format.codec import AnswerCodec
from grounding.answer_format.layout import spaced
from grounding.answer_format.predictions import (
    AUX_CHOICES,
    Prediction,
    predict,
    prediction_row,
    seconds,
)
from grounding.answer_format.timeline import DEFAULT_TIMELINE, Timeline
from grounding.answer_format.tokens import OFFSET
from grounding.checks import NON_NEGATIVE, Checked, checked, integer
from grounding.metrics.grounding import GroundingMetric
from grounding.metrics.iou import THRESHOLDS
from grounding.metrics.protocols import EXACT, Protocol
from grounding.metrics.windows import metric_inputs, record_iou
from lightning_modules.base_weights import (
    IDENTITY,
    base_identity,
    check_identity,
    frozen_names,
    restore_frozen,
    saved_identity,
    without_frozen,
)
from lightning_modules.decoding import DECODERS, InferenceSpec
from lightning_modules.generation import Generation, is_sharded
from lightning_modules.language_model import token_rows_merged
from lightning_modules.optimization import OptimSpec, adamw_with_curve, diverged, finite_loss
from lightning_modules.tokenizer import tokenizer_files
from lightning_modules.trainable import parameter_summary, summary_lines
from lightning_modules.video_llm import VideoLLM
from lightning_modules.weighted_mean import WeightedMean

PRECISION = "trainer_precision"  # the checkpoint's entry: the precision its steps were trained in


# val/ and test/ scores are torchmetrics results, their states summed over the processes before
# compute(): Lightning's advice to average them again across devices (sync_dist) is not for them.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\('(val|test)/")


@dataclass(frozen=True)
class SaliencySpec(Checked):
    """Weight of a per-video-token BCE "inside the queried moment?" on the projector's output (needs
    ``projector.query_conditioned``); 0 turns it off. ``projector_steps``: the run's first optimizer
    steps train only the projector and the saliency head (and the LM's input embeddings of the
    prompt, which the projector reads, where they train and are not tied to the output layer) on this
    loss, without the LM's pass (a few percent of a full step), so the LM's first steps read video
    tokens that already mark the moment (VTimeLLM trains its projector first too, on captions); they
    count in ``trainer.max_steps``."""

    weight: float = checked(3.0, NON_NEGATIVE)
    projector_steps: int = checked(600, integer(0))


def saliency_targets(gt_norm: torch.Tensor, tokens: int) -> torch.Tensor:
    """(B, tokens): 1 where a video token's place on the normalized timeline lies in the truth."""
    places = torch.linspace(0, 1, tokens, device=gt_norm.device, dtype=gt_norm.dtype)
    return ((places >= gt_norm[:, :1]) & (places <= gt_norm[:, 1:])).to(gt_norm.dtype)


class GroundingModule(L.LightningModule):
    """``codec`` (shared with the collator) holds the tokenizer and the refinement schedule: the
    answer layout to decode, and the predicted segments scored one by one as ``{split}/step{k}/mIoU``.
    ``timeline`` (``data.timeline``) reads the answers' indices as seconds; every score follows
    ``protocol`` (``eval.protocol``)."""

    def __init__(
        self,
        model: VideoLLM,
        codec: AnswerCodec,
        aux_weight: float,
        optim: OptimSpec,
        inference: InferenceSpec,
        saliency_weight: float = 0.0,
        projector_steps: int = 0,
        config: dict[str, Any] | None = None,
        timeline: Timeline = DEFAULT_TIMELINE,
        protocol: Protocol = EXACT,
        base_name: str | None = None,
    ) -> None:
        """``config``: the run's resolved config, saved in every checkpoint (``hyper_parameters``)
        together with the tokenizer's files, so a checkpoint says what it is without its run folder.
        ``projector_steps``: the first optimizer steps train the projector and the saliency head on
        the saliency loss alone (no LM pass); the LR curve of the steps after them starts afresh.
        ``base_name``: the pretrained LM the frozen weights come from (``model.lm.name_or_path``);
        checkpoints then leave those out and record their identity (lightning_modules/base_weights.py).
        None (a randomly initialised LM, which no one can rebuild): checkpoints hold everything."""
        super().__init__()
        self.base_name, self._base_identity = base_name, None
        self.save_hyperparameters({"config": config}, logger=False)
        self.model, self.codec, self.tokenizer = model, codec, codec.tokenizer
        self.aux_weight, self.saliency_weight = aux_weight, saliency_weight
        if projector_steps and model.saliency_head is None:
            raise ValueError("projector_steps train the saliency head: it needs saliency_weight > 0")
        self.projector_steps = projector_steps
        self.optim, self.inference, self.timeline = optim, inference, timeline
        with_offsets = codec.schedule.with_offsets
        self.offset_id = self.tokenizer.convert_tokens_to_ids(OFFSET) if with_offsets else None

        def metric() -> GroundingMetric:
            return GroundingMetric(protocol=protocol)

        self.metrics = torch.nn.ModuleDict({split: metric() for split in ("val", "test")})
        # Weighted by queries and summed over the ranks: their shares of a split may differ by one.
        self.losses = torch.nn.ModuleDict({split: WeightedMean() for split in ("val", "test")})
        self.segment_metrics = torch.nn.ModuleDict(
            {
                split: torch.nn.ModuleList(metric() for _ in range(codec.schedule.num_segments))
                for split in ("val", "test")
            }
        )
        # With an aux head, the other final-answer choices are scored too ({split}/aux/..., {split}/mean/...).
        choices = AUX_CHOICES if model.aux_head is not None and with_offsets else ()
        self.choice_metrics = torch.nn.ModuleDict(
            {split: torch.nn.ModuleDict({c: metric() for c in choices}) for split in ("val", "test")}
        )
        self.predictions: list[dict] = []

    def transfer_batch_to_device(self, batch: dict[str, Any], device: torch.device, dataloader_idx: int):
        """Move the tensors; the records (frozen dataclasses) stay on the host as they are."""
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    # ---- training -------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Log which parts train (``model.trainable``, LoRA) and their parameter counts, before the
        strategy wraps the model (FSDP's units hold a rank's flat shards, under other names)."""
        if stage == "fit":
            lines = summary_lines(parameter_summary(self.model))
            rank_zero_info("parameters by part (model.trainable):\n  " + "\n  ".join(lines))

    def _losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = self.model(batch["input_ids"], batch["attention_mask"], batch["features"], batch["labels"])
        losses = {"lm_loss": out.loss}
        if self.model.aux_head is not None and self.offset_id is not None:
            at_offset = batch["input_ids"] == self.offset_id
            segment, logits = self.model.aux_head(out.hidden_states[-1][at_offset])
            rows = at_offset.nonzero()[:, 0]
            losses["aux_loss"] = self.model.aux_head.loss(segment, logits, batch["gt_norm"][rows].to(segment))
            losses["loss"] = out.loss + self.aux_weight * losses["aux_loss"]
        else:
            losses["loss"] = out.loss
        if "saliency_logits" in out:
            logits = out["saliency_logits"]
            target = saliency_targets(batch["gt_norm"].to(logits), logits.shape[1])
            losses["saliency_loss"] = F.binary_cross_entropy_with_logits(logits, target)
            losses["loss"] = losses["loss"] + self.saliency_weight * losses["saliency_loss"]
        return losses

    def _projector_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The saliency loss of the projector's first steps, read without the LM."""
        logits = self.model.saliency_logits(
            batch["input_ids"], batch["attention_mask"], batch["features"], batch["labels"]
        )
        target = saliency_targets(batch["gt_norm"].to(logits), logits.shape[1])
        loss = F.binary_cross_entropy_with_logits(logits, target)
        return {"saliency_loss": loss, "loss": loss}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        first = self.global_step < self.projector_steps
        losses = self._projector_losses(batch) if first else self._losses(batch)
        finite_loss(losses["loss"], self.global_step, self.optim.lr)
        size = len(batch["records"])
        for name, value in losses.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=size)
        return losses["loss"]

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Refuse to step on non-finite gradients (they would make every weight NaN), except under
        fp16's loss scaling, which skips such steps itself."""
        if str(self.trainer.precision).startswith("16"):
            return
        grads = [p.grad.detach().norm() for p in self.parameters() if p.grad is not None]
        finite = torch.isfinite(torch.stack(grads)).all() if grads else torch.tensor(True)
        if isinstance(self.trainer.strategy.model, FullyShardedDataParallel):  # a rank holds its shards
            finite = finite.to(self.device, torch.int32)
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # every rank stops, none waits for the rest
        if not finite:
            raise diverged("the gradients are not finite", self.global_step, self.optim.lr)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip as Lightning does, except by norm under FSDP, which Lightning's FSDP precision refuses:
        there the root unit clips by the norm of every rank's shards together."""
        root = self.trainer.strategy.model
        by_norm = gradient_clip_algorithm in (None, "norm")
        if gradient_clip_val and by_norm and isinstance(root, FullyShardedDataParallel):
            root.clip_grad_norm_(gradient_clip_val)
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ---- evaluation -----------------------------------------------------------------------------
    def _evaluate(self, batch: dict[str, Any], split: str) -> None:
        records = batch["records"]
        self.losses[split].update(self._losses(batch)["loss"].detach(), weight=len(records))
        predictions = self.predict_batch(batch)
        finals, per_segment = [], [[] for _ in self.segment_metrics[split]]
        clip = self.inference.order_and_clip
        for record, prediction in zip(records, predictions, strict=True):
            finals.append(seconds(prediction.final, record.duration, self.timeline, clip))
            for k, column in enumerate(per_segment):
                segment = prediction.segments[k] if k < len(prediction.segments) else None
                column.append(seconds(segment, record.duration, self.timeline, clip))
            if split == "test":
                iou = record_iou(finals[-1], record)
                self.predictions.append(prediction_row(record, prediction, iou, self.timeline, clip))
        unparsed = torch.tensor([not p.segments for p in predictions])  # the aux head may answer them
        self.metrics[split].update(*metric_inputs(finals, records), unparsed=unparsed)
        for choice, metric in self.choice_metrics[split].items():
            chosen = [
                seconds(p.choose(choice), r.duration, self.timeline, clip)
                for r, p in zip(records, predictions, strict=True)
            ]
            metric.update(*metric_inputs(chosen, records))
        answered = torch.tensor([p.final is not None for p in predictions])  # steps not reached: IoU 0
        for metric, column in zip(self.segment_metrics[split], per_segment, strict=True):
            metric.update(*metric_inputs(column, records), answered=answered)

    @property
    def max_new_tokens(self) -> int:
        """The most tokens a generated answer may take."""
        return self.inference.new_tokens(self.codec.answer_length())

    @torch.no_grad()
    def predict_batch(self, batch: dict[str, Any]) -> list[Prediction]:
        """Greedy answers for a batch, parsed into their segments (constrained when configured)."""
        with self.decoding():
            generation = DECODERS[self.inference.decoder](
                self.model,
                batch["prompt_ids"],
                batch["prompt_mask"],
                batch["features"],
                eos_id=self.codec.end_id,
                max_new_tokens=self.max_new_tokens,
                slots=self.codec.slots() if self.inference.constrained else None,
                offset_id=self.offset_id if self.model.aux_head is not None else None,
            )
        return self.parse(generation)

    def decoding(self) -> AbstractContextManager:
        """What decoding runs under: the trained token rows merged into the LM (the same answers,
        without peft's copy of the embedding matrix on every forward pass), unless it is sharded."""
        return nullcontext() if is_sharded(self.model) else token_rows_merged(self.model.lm)

    def parse(self, generation: Generation) -> list[Prediction]:
        """The answers of ``generation`` parsed into their segments (with the aux head's, when kept)."""
        aux, aux_all = self._aux_segments(generation)
        texts = [spaced(t) for t in self.tokenizer.batch_decode(generation.tokens, skip_special_tokens=False)]
        spec, num_segments = self.inference, self.codec.schedule.num_segments
        return [
            predict(text, num_segments, spec.final, a, self.timeline, every, spec.order_and_clip)
            for text, a, every in zip(texts, aux, aux_all, strict=True)
        ]

    def _aux_segments(self, generation: Generation) -> tuple[list, list]:
        """Each answer's aux segment at its last <OFFSET>, and the mean over every <OFFSET> (None without)."""
        rows = len(generation.tokens)
        if generation.offset_hidden is None or self.model.aux_head is None:
            return [None] * rows, [None] * rows
        segment, _ = self.model.aux_head(generation.offset_hidden)
        last = [
            tuple(s) if ok else None
            for s, ok in zip(segment.tolist(), generation.has_offset.tolist(), strict=True)
        ]
        states = generation.offset_states or [None] * rows
        every = [None if h is None else tuple(self.model.aux_head(h)[0].mean(0).tolist()) for h in states]
        return last, every

    def evaluation_keys(self, split: str) -> list[str]:
        """The metrics an evaluation of ``split`` logs (what a checkpoint or early stopping can monitor)."""
        return [
            f"{split}/{name}"
            for name in (
                "loss",
                *(f"R1@{t}" for t in THRESHOLDS),
                "mIoU",
                "parse_fail",
                "queries",
                *(f"step{k}/mIoU" for k in range(len(self.segment_metrics[split]))),
                *(f"{choice}/mIoU" for choice in self.choice_metrics[split]),
            )
        ]

    def _log_metrics(self, split: str) -> None:
        scores = self.metrics[split].compute()
        self.log(f"{split}/loss", self.losses[split].compute())
        self.losses[split].reset()
        for name in (*(f"R1@{t}" for t in THRESHOLDS), "mIoU", "parse_fail"):
            self.log(f"{split}/{name}", scores[name], prog_bar=name == "mIoU")
        self.log(f"{split}/queries", scores["count"], reduce_fx="max")
        for k, metric in enumerate(self.segment_metrics[split]):
            self.log(f"{split}/step{k}/mIoU", metric.compute()["mIoU"])
            metric.reset()
        for choice, metric in self.choice_metrics[split].items():
            self.log(f"{split}/{choice}/mIoU", metric.compute()["mIoU"])
            metric.reset()
        self.metrics[split].reset()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    @property
    def base_identity(self) -> dict[str, Any]:
        """The frozen base weights' name and digest (computed once: they do not change)."""
        if self._base_identity is None:
            self._base_identity = base_identity(self, str(self.base_name))
        return self._base_identity

    def base_changed(self) -> None:
        """The LM's frozen weights changed (adapters merged into them): digest them anew when asked."""
        self._base_identity = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tokenizer_files"] = tokenizer_files(self.tokenizer)
        if self._trainer is not None:  # what trainer.precision=auto chose, checked on resume
            checkpoint[PRECISION] = self.trainer.precision
        sharded = self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy)
        if self.base_name is not None and not sharded:  # FSDP's sharded checkpoints keep every tensor
            checkpoint[IDENTITY] = self.base_identity
            checkpoint["state_dict"] = without_frozen(checkpoint["state_dict"], frozen_names(self))

    def check_base(self, checkpoint: Path) -> None:
        """Raise BaseWeightsError when the checkpoint file was trained on other base weights (a
        sharded checkpoint, a folder, keeps every tensor)."""
        saved = None if checkpoint.is_dir() else saved_identity(checkpoint)
        if saved is not None:
            check_identity(saved, self.base_identity)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Put the base's frozen weights back into a checkpoint that left them out (refused when the
        checkpoint was trained on other base weights)."""
        if IDENTITY in checkpoint:
            restore_frozen(self, checkpoint, self.base_identity)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_start(self) -> None:
        self.predictions = []

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    # ---- optimisation ---------------------------------------------------------------------------
    def optimizer_steps(self) -> int:
        """The optimizer steps the run will take, which the learning-rate schedule spans."""
        return int(self.trainer.estimated_stepping_batches)

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_with_curve(self, self.optim, self.projector_steps, self.optimizer_steps())
