"""GRPO as a training mode of the grounding module: reinforcement fine-tuning after supervised training.

Each training batch becomes a rollout: G answers per query sampled with the project's decoder
(temperature, top-p; constrained to the answer layout so every answer parses, or free with the
``format`` reward), each rewarded (grounding/metrics/rewards.py), their advantages normalised within
the query's group. The policy then takes ``num_iterations`` optimizer steps on that rollout
(lightning_modules/grpo_loss.py): the first one's ratio to the sampling policy is 1, the later ones'
is not. A token counts when the model chose it: in a constrained answer the digits and signs (the
policy is the model's distribution renormalised over the tokens the layout allows there), in a free
one every token and the end. The aux head keeps its supervised loss on the sampled answers'
<OFFSET> states (``aux=train``) or is frozen. Validation and testing are the supervised module's.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from grounding.answer_format.predictions import Prediction, seconds
from grounding.answer_format.tokens import IGNORE_INDEX, OFFSET, RETHINK
from grounding.checks import NON_NEGATIVE, Checked, checked, integer, items, number, one_of
from grounding.metrics.rewards import REWARDS, Answer, total_reward
from grounding.metrics.windows import record_iou
from lightning_modules.base_weights import weights_digest
from lightning_modules.generation import Generation, Sampling, choosable_placeholder, generate
from lightning_modules.grounding_module import GroundingModule
from lightning_modules.grpo_loss import group_advantages, grpo_loss, no_signal_share
from lightning_modules.optimization import finite_loss
from lightning_modules.slot_logits_processor import layout_automaton
from lightning_modules.video_llm import VideoLLM

AUX_MODES = ("train", "freeze")
CREDITS = ("answer", "step")


@dataclass
class GRPOSpec(Checked):
    """The GRPO stage's keys, named as TRL names them (conf/experiment/grpo.yaml gives the published
    defaults): ``G`` answers per query, KL weight ``beta``, clip range ``epsilon``, sampling
    ``temperature`` (0: greedy) and ``top_p``, ``num_iterations`` optimizer steps per rollout,
    ``reward``: the names of ``REWARDS`` to sum, ``refine_bonus``: refine_gain's bonus per step that
    raised the IoU, ``constrained``: sample within the answer layout, ``aux``: train or freeze the aux
    head. ``credit``: which advantage a chosen token gets, ``answer``'s (every token the same, as
    published) or its ``step``'s: the first coarse segment's tokens are rewarded as if that segment
    were the answer, each refinement round's tokens as if the segment it refines to were (needs
    ``constrained``). ``disable_dropout``: dropout off in the policy (TRL's key; its default is
    False), so the sampled answers, their scores and the KL reference see one model and the first
    step's ratio is 1. ``enabled`` turns the stage on."""

    enabled: bool = False
    G: int = checked(8, integer(2))
    beta: float = checked(0.04, NON_NEGATIVE)
    epsilon: float = checked(0.2, number(0, 1, open_low=True, open_high=True))
    temperature: float = checked(1.0, NON_NEGATIVE)
    top_p: float = checked(1.0, number(0, 1, open_low=True))
    num_iterations: int = checked(1, integer(1))
    reward: list[str] = checked(["iou"], items(one_of(*REWARDS), 1))
    refine_bonus: float = checked(0.1, NON_NEGATIVE)
    constrained: bool = True
    aux: str = checked("train", one_of(*AUX_MODES))
    credit: str = checked("answer", one_of(*CREDITS))
    disable_dropout: bool = True

    def relations(self) -> Iterator[str]:
        if self.credit == "step" and not self.constrained:
            yield "credit=step needs constrained=true: a free answer's tokens need not follow the layout's steps"


@dataclass
class Rollout:
    """A batch's sampled answers as sequences to score: (N, T) ``input_ids``/``attention_mask``/
    ``labels`` (the answers labelled), ``mask`` (N, T - 1): the next-token positions that count;
    constrained, ``allowed`` (tokens counted, width) the layout's tokens at each of them (-1 pads),
    ``picked`` the sampled one's place among them and ``step`` (N, T - 1) the segment each counted
    token writes (:func:`segment_steps`). ``advantages``: (N,) per answer or (N, T - 1) per token."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    features: torch.Tensor
    gt_norm: torch.Tensor
    mask: torch.Tensor
    allowed: torch.Tensor | None
    picked: torch.Tensor | None
    step: torch.Tensor
    advantages: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None


def without_dropout(model: nn.Module) -> None:
    """Every dropout of ``model`` set to 0: its ``nn.Dropout`` layers (LoRA's, GPT-2's) and the rates
    Hugging Face layers keep to call dropout with (``attention_dropout``: Llama, Qwen2; ``dropout``,
    ``activation_dropout``: OPT)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if name.endswith("dropout") and isinstance(value, float):
                setattr(module, name, 0.0)


def cast_like(reference: nn.Module, model: nn.Module) -> None:
    """``reference``'s weights and buffers in the dtypes of ``model``'s, name by name: a ``*-true`` precision
    casts the policy, not its KL reference, which no module holds."""
    dtypes = {name: t.dtype for name, t in chain(model.named_parameters(), model.named_buffers())}
    for name, tensor in chain(reference.named_parameters(), reference.named_buffers()):
        if name in dtypes and tensor.is_floating_point():
            tensor.data = tensor.data.to(dtypes[name])


def choices_made(automaton: list[dict[int, int]], answer: list[int]) -> list[tuple[int, list[int]]]:
    """Each place in ``answer`` where the layout allowed more than one token, with those tokens."""
    state, made = 0, []
    for place, token in enumerate(answer):
        options = automaton[state]
        if len(options) > 1:
            made.append((place, list(options)))
        state = options[token]
    return made


def segment_steps(answer: list[int], markers: set[int]) -> list[int]:
    """For each place in ``answer``, which predicted segment (0: the first coarse one, i + 1: round
    i's refined one) its token writes: round 0's start and end write segment 0; a round's offsets,
    and the coarse segment a later round restates after ``<RETHINK>``, write that round's refined
    segment. Read from the ``markers`` (``<OFFSET>``, ``<RETHINK>`` ids) before it, in one pass."""
    steps, seen = [], 0
    for token in answer:
        steps.append(0 if seen == 0 else seen // 2 + 1)
        seen += token in markers
    return steps


REFERENCE = "grpo_reference"  # the checkpoint key of the KL reference's digest


class ReferenceChangedError(ValueError):
    """A GRPO run resumed against another KL reference than it started with."""


class GRPOModule(GroundingModule):
    """The grounding module trained by GRPO (``grpo``); optimisation is manual, as each rollout
    serves ``num_iterations`` steps. ``max_grad_norm``: gradient clipping (``trainer.gradient_clip_val``).
    Call :meth:`keep_reference` once the starting weights are in."""

    def __init__(self, *args: Any, grpo: GRPOSpec, max_grad_norm: float | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.grpo, self.max_grad_norm = grpo, max_grad_norm
        self.automatic_optimization = False
        self._reference: list[VideoLLM] = []  # a list: no submodule, so not in checkpoints
        self._reference_digest: str | None = None
        self._automaton = (
            layout_automaton(self.codec.slots(), self.codec.end_id) if grpo.constrained else None
        )
        self._markers = set(self.tokenizer.convert_tokens_to_ids([OFFSET, RETHINK]))

    def keep_reference(self) -> None:
        """Turn the policy's dropout off with ``disable_dropout`` (here, as ``init_from_run`` may have
        added adapters, each with its dropout), then freeze a copy of the model as it is now as the KL's
        reference (none when beta is 0), the aux head with ``aux=freeze``, and the saliency head: no GRPO
        loss reaches it, and DDP (without the cost of ``find_unused_parameters``) needs every trainable
        parameter to get a gradient."""
        if self.grpo.disable_dropout:
            without_dropout(self.model)
        self._reference = [copy.deepcopy(self.model).eval().requires_grad_(False)] if self.grpo.beta else []
        self._reference_digest = None
        frozen = [self.model.saliency_head] + [self.model.aux_head] * (self.grpo.aux == "freeze")
        for head in frozen:
            if head is not None:
                head.requires_grad_(False)

    def reference_digest(self) -> str | None:
        """SHA-256 of the KL reference's weights (computed once: it is frozen); None without one."""
        if self._reference and self._reference_digest is None:
            reference = self._reference[0]
            self._reference_digest = weights_digest(reference, sorted(reference.state_dict()))
        return self._reference_digest

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if (digest := self.reference_digest()) is not None:
            checkpoint[REFERENCE] = digest

    def check_base(self, checkpoint: Path) -> None:
        """Also refuse to resume against another KL reference than the run started with: the run it
        started from (``init_from_run``) has trained on since, so its best checkpoint is another."""
        super().check_base(checkpoint)
        saved = (
            None
            if checkpoint.is_dir()
            else torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True).get(REFERENCE)
        )
        if saved is not None and saved != self.reference_digest():
            raise ReferenceChangedError(
                f"{checkpoint}: this GRPO run started from other weights (KL reference sha256 {saved[:12]}) "
                f"than the run it starts from holds now ({self.reference_digest()[:12]}): init_from_run's "
                "best checkpoint changed; start a new output_dir from it"
            )

    def optimizer_steps(self) -> int:
        """``num_iterations`` per rollout (Lightning counts the batches that step), up to
        ``trainer.max_steps``, which counts optimizer steps as ``global_step`` does."""
        steps = self.trainer.estimated_stepping_batches * self.grpo.num_iterations
        max_steps = self.trainer.max_steps
        return int(steps if max_steps == -1 else min(steps, max_steps))

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.reference_digest()  # of the weights it started from, before the cast a resume compares with
        for reference in self._reference:
            cast_like(reference.to(self.device), self.model)

    # ---- the rollout ------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, batch: dict[str, Any]) -> list[list[int]]:
        """G answers per query, each query's in a row."""
        group = self.grpo.G
        with self.decoding():
            generation = generate(
                self.model,
                batch["prompt_ids"].repeat_interleave(group, 0),
                batch["prompt_mask"].repeat_interleave(group, 0),
                batch["features"].repeat_interleave(group, 0),
                eos_id=self.codec.end_id,
                max_new_tokens=self.max_new_tokens,
                slots=self.codec.slots() if self.grpo.constrained else None,
                choose=Sampling(self.grpo.temperature, self.grpo.top_p),
            )
        return generation.tokens

    def parse_answers(self, answers: list[list[int]]) -> list[Prediction]:
        """The sampled answers parsed into their segments (no aux head states: the text's)."""
        return self.parse(Generation(answers, None, torch.zeros(len(answers), dtype=torch.bool)))

    def rewards(self, answers: list[list[int]], records: list) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, S) rewards, the last column each answer's own; with ``credit=step`` S is the number of
        predicted segments, column j the reward as if the answer ended at segment j (else S = 1);
        and (N,) final IoUs."""
        predictions = self.parse_answers(answers)
        expected, clip = self.codec.schedule.num_segments, self.inference.order_and_clip
        rewards, ious = [], []
        for prediction, record in zip(predictions, records, strict=True):
            steps = tuple(seconds(s, record.duration, self.timeline, clip) for s in prediction.segments)
            answer = Answer(steps, expected)
            ends = range(1, expected + 1) if self.grpo.credit == "step" else [expected]
            rewards.append(
                [
                    total_reward(self.grpo.reward, Answer(steps[:end], end), record, self.grpo.refine_bonus)
                    for end in ends
                ]
            )
            ious.append(record_iou(answer.final, record))
        return torch.tensor(rewards, device=self.device), torch.tensor(ious, device=self.device)

    def rollout(self, batch: dict[str, Any]) -> Rollout:
        group = self.grpo.G
        records = [r for r in batch["records"] for _ in range(group)]
        answers = self.sample(batch)
        per_step, ious = self.rewards(answers, records)
        rewards = per_step[:, -1]
        rollout = self._sequences(batch, answers)
        if self.grpo.credit == "step":  # each segment's rewards normalised within the group, per token
            steps = torch.stack([group_advantages(column, group) for column in per_step.T], 1)
            rollout.advantages = steps.gather(1, rollout.step)
        else:
            rollout.advantages = group_advantages(rewards, group)
        rollout.stats = {
            "reward_mean": rewards.mean(),
            "reward_std": rewards.view(-1, group).std(1).mean(),
            "no_signal": no_signal_share(per_step if self.grpo.credit == "step" else rewards, group),
            "sampled_iou": ious.mean(),
            "answer_length": torch.tensor([len(a) for a in answers], dtype=torch.float).mean(),
        }
        with torch.no_grad():
            if self.grpo.num_iterations > 1:
                rollout.old_logp = self.token_logps(self.model, rollout)[0]
            if self._reference:
                rollout.ref_logp = self.token_logps(self._reference[0], rollout)[0]
        return rollout

    def _sequences(self, batch: dict[str, Any], answers: list[list[int]]) -> Rollout:
        """The prompts (unpadded) followed by their answers, right-padded; in free decoding an answer
        that ended keeps its end token (the policy chose it)."""
        group, prompts = self.grpo.G, []
        for ids, keep in zip(batch["prompt_ids"].tolist(), batch["prompt_mask"].tolist(), strict=True):
            prompts += [[t for t, k in zip(ids, keep, strict=True) if k]] * group
        if self._automaton is None:
            answers = [[*a, self.codec.end_id] if len(a) < self.max_new_tokens else a for a in answers]
        length = max(len(p) + len(a) for p, a in zip(prompts, answers, strict=True))
        rows = len(answers)
        input_ids = torch.full((rows, length), self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        attention = torch.zeros_like(input_ids)
        mask = torch.zeros(rows, length - 1, dtype=torch.bool)
        step = torch.zeros(rows, length - 1, dtype=torch.long)
        allowed, picked = [], []
        for row, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
            start, end = len(prompt), len(prompt) + len(answer)
            input_ids[row, :end] = torch.tensor(prompt + answer)
            labels[row, start:end] = torch.tensor(answer)
            attention[row, :end] = 1
            if self._automaton is None:
                mask[row, start - 1 : end - 1] = True
                continue
            steps = segment_steps(answer, self._markers)
            for place, options in choices_made(self._automaton, answer):
                mask[row, start - 1 + place] = True
                step[row, start - 1 + place] = steps[place]
                allowed.append(options)
                picked.append(options.index(answer[place]))
        width = max(map(len, allowed), default=1)
        device = self.device
        return Rollout(
            input_ids.to(device),
            attention.to(device),
            labels.to(device),
            batch["features"].repeat_interleave(group, 0),
            batch["gt_norm"].repeat_interleave(group, 0),
            mask.to(device),
            torch.tensor([a + [-1] * (width - len(a)) for a in allowed], device=device) if allowed else None,
            torch.tensor(picked, device=device) if picked else None,
            step.to(device),
            advantages=torch.zeros(rows, device=device),
        )

    # ---- the loss ---------------------------------------------------------------------------------
    def token_logps(self, model: VideoLLM, rollout: Rollout) -> tuple[torch.Tensor, Any]:
        """(N, T - 1) log-probabilities of the chosen tokens at the counted places (0 elsewhere) under
        the policy sampled (logits divided by the temperature when > 0, over the layout's tokens or,
        free, all but the placeholder; not top_p's cut, as TRL), and the model's output."""
        out = model(rollout.input_ids, rollout.attention_mask, rollout.features, rollout.labels)
        logits = out.logits.float()  # (labelled tokens, vocabulary), row-major
        if self.grpo.temperature > 0:
            logits = logits / self.grpo.temperature
        labelled = rollout.labels[:, 1:] != IGNORE_INDEX
        counted = rollout.mask[labelled]  # which labelled tokens count
        if rollout.allowed is None:  # free: sampled without the placeholder
            targets, scores = rollout.labels[:, 1:][labelled][counted], logits[counted]
            if (placeholder := choosable_placeholder(model)) is not None:
                scores = scores.index_fill(-1, torch.tensor([placeholder], device=scores.device), -torch.inf)
            chosen = F.log_softmax(scores, -1).gather(1, targets[:, None]).squeeze(1)
        else:
            scores = logits[counted].gather(1, rollout.allowed.clamp(min=0))
            scores = scores.masked_fill(rollout.allowed < 0, -torch.inf)
            chosen = F.log_softmax(scores, -1).gather(1, rollout.picked[:, None]).squeeze(1)
        logp = torch.zeros(rollout.mask.shape, dtype=chosen.dtype, device=chosen.device)
        return logp.masked_scatter(rollout.mask, chosen), out

    def grpo_losses(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        logp, out = self.token_logps(self.model, rollout)
        old = rollout.old_logp if rollout.old_logp is not None else logp.detach()
        loss, stats = grpo_loss(
            logp, old, rollout.ref_logp, rollout.advantages, rollout.mask, self.grpo.epsilon, self.grpo.beta
        )
        losses = {"grpo_loss": loss, **stats}
        head = self.model.aux_head
        if head is not None and self.offset_id is not None and self.grpo.aux == "train":
            at_offset = rollout.input_ids == self.offset_id
            segment, aux_logits = head(out.hidden_states[-1][at_offset])
            target = rollout.gt_norm[at_offset.nonzero()[:, 0]].to(segment)
            losses["aux_loss"] = head.loss(segment, aux_logits, target)
            loss = loss + self.aux_weight * losses["aux_loss"]
        losses["loss"] = loss
        return losses

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip the gradients where Lightning has unscaled fp16's (``16-mixed``): before, the loss
        scale's gradients were clipped, and each step moved 1/scale as far as it should."""
        super().on_before_optimizer_step(optimizer)
        if self.max_grad_norm:
            self.configure_gradient_clipping(optimizer, self.max_grad_norm, "norm")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        rollout = self.rollout(batch)
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        for _ in range(self.grpo.num_iterations):
            losses = self.grpo_losses(rollout)
            finite_loss(losses["loss"], self.global_step, self.optim.lr)
            optimizer.zero_grad()
            self.manual_backward(losses["loss"])
            optimizer.step()  # clipped in on_before_optimizer_step
            scheduler.step()
        size = len(batch["records"])
        for name, value in {**rollout.stats, **losses}.items():
            self.log(f"train/{name}", value, prog_bar=name in ("loss", "reward_mean"), batch_size=size)
        return losses["loss"].detach()
