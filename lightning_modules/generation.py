"""Batched greedy decoding with a KV cache, free or constrained to the answer layout.

Prompts are left-padded. While decoding, the last hidden state at every <OFFSET> token fed to the
model is kept, so the aux head can read it. With an FSDP-sharded model every forward pass is a
collective (it all-gathers the sharded layers), so free decoding stops only once the answers of every
rank have ended: all ranks run the same passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

from lightning_modules.video_llm import VideoLLM
from timerefine.answer_format.codec import Slot


@dataclass
class Generation:
    tokens: list[list[int]]
    offset_hidden: torch.Tensor | None  # (B, hidden) at the last <OFFSET> fed, NaN-free zeros if none
    has_offset: torch.Tensor  # (B,) bool


class _Decoder:
    """Holds the KV cache and the running attention mask of one batch.

    Fed tokens wait until logits are asked for, so consecutive feeds run as one forward pass: the
    prompt with the answer's first fixed text, each chosen digit or sign with the fixed text after
    it. Tokens fed after the last choice run only if the aux head needs one of them (an <OFFSET>).
    """

    def __init__(
        self, model: VideoLLM, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, features, offset_id
    ):
        self.model, self.offset_id = model, offset_id
        self.mask = prompt_mask[:, :0]  # the columns in the cache
        self.past = None
        self.offset_hidden = None
        self.has_offset = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)
        self._pending = [(prompt_ids, prompt_mask, model.embed(prompt_ids, features, prompt_mask))]
        self._logits: torch.Tensor | None = None

    def feed(self, tokens: torch.Tensor) -> None:
        """Append ``tokens`` (B, n); they run with the next pass."""
        embeds = self.model.lm.get_input_embeddings()(tokens)
        self._pending.append((tokens, torch.ones_like(tokens, dtype=self.mask.dtype), embeds))
        self._logits = None

    @property
    def last_logits(self) -> torch.Tensor:
        """(B, vocabulary) float logits after everything fed so far."""
        if self._logits is None:
            self._run()
        return self._logits

    def finish(self) -> None:
        """Run the waiting tokens if the aux head needs the hidden state of one of them."""
        if self.offset_id is not None and any((t == self.offset_id).any() for t, _, _ in self._pending):
            self._run()

    def _run(self) -> None:
        tokens, mask, embeds = (torch.cat(parts, dim=1) for parts in zip(*self._pending, strict=True))
        self._pending = []
        self.mask = torch.cat([self.mask, mask], dim=1)
        positions = (self.mask.long().cumsum(-1) - 1)[:, -tokens.shape[1] :].clamp(min=0)
        out = self.model.lm(
            inputs_embeds=embeds,
            attention_mask=self.mask,
            position_ids=positions,
            cache=self.past,
            use_cache=True,
            logits_to_keep=1,
            output_hidden_states=self.offset_id is not None,
        )
        self.past = out.cache
        self._logits = out.logits[:, -1].float()
        if self.offset_id is not None:
            self._keep_offset_hidden(tokens, out.hidden_states[-1])

    def _keep_offset_hidden(self, tokens: torch.Tensor, hidden: torch.Tensor) -> None:
        if self.offset_hidden is None:
            self.offset_hidden = hidden.new_zeros(hidden.shape[0], hidden.shape[-1])
        for column in (tokens == self.offset_id).any(0).nonzero().flatten().tolist():
            is_offset = tokens[:, column] == self.offset_id
            self.offset_hidden[is_offset] = hidden[is_offset, column]
            self.has_offset |= is_offset


@torch.no_grad()
def generate(
    model: VideoLLM,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    features: torch.Tensor,
    eos_id: int,
    max_new_tokens: int,
    slots: list[Slot] | None = None,
    offset_id: int | None = None,
) -> Generation:
    """Greedy answers; with ``slots`` only digits/signs are chosen and every answer parses."""
    decoder = _Decoder(model, prompt_ids, prompt_mask, features, offset_id)
    batch, device = prompt_ids.shape[0], prompt_ids.device
    columns: list[torch.Tensor] = []
    if slots is not None:
        for slot in slots:
            if slot.fixed:
                step = torch.tensor(slot.fixed, device=device).expand(batch, -1)
            else:
                choices = torch.tensor(slot.choices, device=device)
                step = choices[decoder.last_logits[:, choices].argmax(-1)].unsqueeze(1)
            columns.append(step)
            decoder.feed(step)
        tokens = torch.cat(columns, dim=1).tolist()
    else:
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        in_step = is_sharded(model)
        for _ in range(max_new_tokens):
            step = decoder.last_logits.argmax(-1)
            step = torch.where(finished, torch.full_like(step, eos_id), step)
            columns.append(step)
            finished |= step == eos_id
            if all_finished(finished, across_ranks=in_step):
                break
            decoder.feed(step.unsqueeze(1))
        tokens = [_until_eos(row, eos_id) for row in torch.stack(columns, dim=1).tolist()]
    decoder.finish()
    return Generation(tokens, decoder.offset_hidden, decoder.has_offset)


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` holds FSDP units (FSDP1 or FSDP2), whose every forward all-gathers their shards."""
    return any(isinstance(m, (FullyShardedDataParallel, FSDPModule)) for m in model.modules())


def all_finished(finished: torch.Tensor, across_ranks: bool) -> bool:
    """Whether every answer has ended; ``across_ranks``: on every rank of the default process group."""
    done = finished.all().to(torch.int32)
    if across_ranks:
        dist.all_reduce(done, op=dist.ReduceOp.MIN)
    return bool(done)


def _until_eos(row: list[int], eos_id: int) -> list[int]:
    return row[: row.index(eos_id)] if eos_id in row else row
