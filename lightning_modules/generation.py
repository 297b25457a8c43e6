"""Batched greedy decoding with a KV cache, free or constrained to the answer layout.

Constrained decoding copies the fixed tokens and walks each choice slot's token trie, taking the
best-scoring allowed token at every level; a row whose pick is complete waits (its fed token is
masked out) until the slot's longest pick in the batch is. A forward pass runs only when logits
are needed: each chosen token goes with the fixed text after it. Prompts are left-padded. While
decoding, the last hidden state at every <OFFSET> token fed to the model is kept, so the aux head
can read it. With an FSDP-sharded model every forward pass is a
collective (it all-gathers the sharded layers), so free decoding stops only once the answers of every
rank have ended: all ranks run the same passes. ``hf_generation.hf_generate`` writes the same answers
through Hugging Face ``generate()`` (``model.inference.decoder``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
from transformers import Cache

from grounding.answer_format.codec import Slot
from lightning_modules.video_llm import VideoLLM


@dataclass
class Generation:
    tokens: list[list[int]]
    offset_hidden: torch.Tensor | None  # (B, hidden) at the last <OFFSET> fed, NaN-free zeros if none
    has_offset: torch.Tensor  # (B,) bool
    offset_states: list[torch.Tensor | None] | None = None  # per row (<OFFSET>s fed, hidden), in order


Choose = Callable[[torch.Tensor], torch.Tensor]  # (B, n) scores, -inf where not allowed -> (B,) picks


def greedy(scores: torch.Tensor) -> torch.Tensor:
    return scores.argmax(-1)


@dataclass(frozen=True)
class Sampling:
    """Draws each pick from softmax(scores / ``temperature``) cut to the smallest set of the most
    likely tokens whose probability reaches ``top_p`` (nucleus sampling); temperature 0 is greedy.
    Uses torch's global random state (restored on resume with the run's)."""

    temperature: float = 1.0
    top_p: float = 1.0

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        if self.temperature == 0:
            return greedy(scores)
        probs = torch.softmax(scores / self.temperature, -1)
        if self.top_p < 1:
            ranked, order = probs.sort(-1, descending=True)
            ranked = ranked.masked_fill(ranked.cumsum(-1) - ranked >= self.top_p, 0)
            probs = torch.zeros_like(probs).scatter(-1, order, ranked)
        return torch.multinomial(probs, 1).squeeze(-1)


class Decoder:
    """Holds the KV cache and the running attention mask of one batch.

    Fed tokens wait until logits are asked for, so consecutive feeds run as one forward pass: the
    prompt with the answer's first fixed text, each chosen token with the fixed text after it.
    Tokens fed after the last choice run only if the aux head needs one of them (an <OFFSET>).
    ``cache``: the KV cache to fill (e.g. a ``StaticCache``); None grows a ``DynamicCache``.
    """

    def __init__(
        self,
        model: VideoLLM,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        features,
        offset_id,
        cache: Cache | None = None,
    ):
        self.model, self.offset_id = model, offset_id
        self.mask = prompt_mask[:, :0]  # the columns in the cache
        self.past = cache
        self.offset_hidden = None
        self.has_offset = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)
        self.offset_states: list[list[torch.Tensor]] = [[] for _ in range(prompt_ids.shape[0])]
        self._pending = [(prompt_ids, prompt_mask, model.embed(prompt_ids, features, prompt_mask))]
        self._logits: torch.Tensor | None = None

    def feed(self, tokens: torch.Tensor, fed: torch.Tensor | None = None) -> None:
        """Append ``tokens`` (B, n), to run with the next pass; with ``fed`` (B,) bool, only those
        rows' single token counts (the others are masked out and keep their last logits)."""
        mask = torch.ones_like(tokens, dtype=self.mask.dtype) if fed is None else fed[:, None].to(self.mask)
        self._pending.append((tokens, mask, self.model.lm.get_input_embeddings()(tokens)))

    @property
    def last_logits(self) -> torch.Tensor:
        """(B, vocabulary) float logits after each row's last fed token."""
        if self._pending:
            self.run()
        return self._logits

    def finish(self) -> None:
        """Run the waiting tokens if the aux head needs the hidden state of one of them."""
        if self.offset_id is not None and any((t == self.offset_id).any() for t, _, _ in self._pending):
            self.run()

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Keep only the rows ``keep`` (indices) of the batch: their dynamic cache, mask, waiting
        tokens and aux state."""
        for layer in self.past.layers if self.past is not None else ():
            if layer.is_initialized:
                layer.keys, layer.values = layer.keys[keep], layer.values[keep]
        self.mask, self.has_offset = self.mask[keep], self.has_offset[keep]
        self._pending = [tuple(part[keep] for part in item) for item in self._pending]
        self._logits = None if self._logits is None else self._logits[keep]
        self.offset_hidden = None if self.offset_hidden is None else self.offset_hidden[keep]
        self.offset_states = [self.offset_states[row] for row in keep.tolist()]

    def run(self) -> None:
        """Run the waiting tokens now, as one forward pass."""
        tokens, mask, embeds = (torch.cat(parts, dim=1) for parts in zip(*self._pending, strict=True))
        self._pending = []
        self.mask = torch.cat([self.mask, mask], dim=1)
        positions = (self.mask.long().cumsum(-1) - 1)[:, -tokens.shape[1] :].clamp(min=0)
        new = mask.bool()
        last = tokens.shape[1] - 1 - new.flip(1).int().argmax(1)  # each row's last fed column
        columns = torch.unique(last)
        out = self.model.lm(
            inputs_embeds=embeds,
            attention_mask=self.mask,
            position_ids=positions,
            cache=self.past,
            use_cache=True,
            logits_to_keep=columns,
            output_hidden_states=self.offset_id is not None,
        )
        self.past = out.cache
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        logits = out.logits[rows, torch.searchsorted(columns, last)].float()
        fed = new.any(1, keepdim=True)
        self._logits = logits if self._logits is None else torch.where(fed, logits, self._logits)
        if self.offset_id is not None:
            self._keep_offset_hidden(tokens, out.hidden_states[-1], new)

    def _keep_offset_hidden(self, tokens: torch.Tensor, hidden: torch.Tensor, fed: torch.Tensor) -> None:
        if self.offset_hidden is None:
            self.offset_hidden = hidden.new_zeros(hidden.shape[0], hidden.shape[-1])
        at_offset = (tokens == self.offset_id) & fed
        for column in at_offset.any(0).nonzero().flatten().tolist():
            is_offset = at_offset[:, column]
            self.offset_hidden[is_offset] = hidden[is_offset, column]
            self.has_offset |= is_offset
            for row in is_offset.nonzero().flatten().tolist():
                self.offset_states[row].append(hidden[row, column])

    def generation(self, tokens: list[list[int]]) -> Generation:
        """The answers ``tokens`` with the hidden states kept at their <OFFSET> tokens."""
        states = [torch.stack(row) if row else None for row in self.offset_states]
        return Generation(
            tokens, self.offset_hidden, self.has_offset, states if self.offset_hidden is not None else None
        )


def choosable_placeholder(model: VideoLLM) -> int | None:
    """The ``<video>`` placeholder's id where free decoding could choose it (a token; the reference
    layout's negative index is none), else None: no answer may hold it. (Read from the id, not from
    the output layer, whose weight FSDP may hold as an empty shard.)"""
    return model.video_token_id if model.video_token_id >= 0 else None


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
    choose: Choose = greedy,
) -> Generation:
    """Greedy answers (or each token as ``choose`` picks it, e.g. a :class:`Sampling`); with
    ``slots`` only the choice slots are chosen and every answer parses."""
    decoder = Decoder(model, prompt_ids, prompt_mask, features, offset_id)
    batch, device = prompt_ids.shape[0], prompt_ids.device
    in_step = is_sharded(model)
    if slots is not None:
        tokens = constrained(decoder, slots, in_step, choose)
    else:
        columns: list[torch.Tensor] = []
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        placeholder = choosable_placeholder(model)
        for _ in range(max_new_tokens):
            logits = decoder.last_logits
            if placeholder is not None:  # an answer holding it could not be embedded again (GRPO)
                logits = logits.index_fill(-1, torch.tensor([placeholder], device=device), float("-inf"))
            step = choose(logits)
            step = torch.where(finished, torch.full_like(step, eos_id), step)
            columns.append(step)
            finished |= step == eos_id
            if all_finished(finished, across_ranks=in_step):
                break
            decoder.feed(step.unsqueeze(1))
        tokens = [_until_eos(row, eos_id) for row in torch.stack(columns, dim=1).tolist()]
    decoder.finish()
    return decoder.generation(tokens)


def constrained(
    decoder: Decoder, slots: list[Slot], in_step: bool = False, choose: Choose = greedy
) -> list[list[int]]:
    """Each row's tokens: the fixed slots copied, each choice slot's trie walked, ``choose`` picking
    among the allowed tokens (greedily by default). ``in_step``: every rank of the default process
    group decodes in step (a sharded model)."""
    batch, device = decoder.mask.shape[0], decoder.mask.device
    columns: list[torch.Tensor] = []  # (B,) tokens fed
    written: list[torch.Tensor] = []  # (B,) bool: whether that token belongs to the row's answer
    for slot in slots:
        if slot.fixed:
            step = torch.tensor(slot.fixed, device=device).expand(batch, -1)
            columns += step.unbind(1)
            written += [torch.ones(batch, dtype=torch.bool, device=device)] * step.shape[1]
            decoder.feed(step)
            continue
        for step, fed in _walk(decoder, _trie(slot.choices, device), in_step, choose):
            columns.append(step)
            written.append(fed)
    tokens, kept = torch.stack(columns, 1).tolist(), torch.stack(written, 1).tolist()
    return [[t for t, keep in zip(*row, strict=True) if keep] for row in zip(tokens, kept, strict=True)]


class _Trie:
    """A slot's choices as a token trie: for each node, its children's tokens and node numbers
    (padded with -1 and 0); node 0 is the root, a node without children ends a choice."""

    def __init__(self, choices: tuple[tuple[int, ...], ...], device: torch.device) -> None:
        children: list[dict[int, int]] = [{}]
        for choice in choices:
            node = 0
            for token in choice:
                if token not in children[node]:
                    children[node][token] = len(children)
                    children.append({})
                node = children[node][token]
        width = max(map(len, children))
        self.tokens = torch.tensor([[*c, *[-1] * (width - len(c))] for c in children], device=device)
        self.nodes = torch.tensor([[*c.values(), *[0] * (width - len(c))] for c in children], device=device)
        self.depth = max(map(len, choices))


@lru_cache(maxsize=256)
def _trie(choices: tuple[tuple[int, ...], ...], device: torch.device) -> _Trie:
    """Built once per slot and device (every batch decodes the same slots)."""
    return _Trie(choices, device)


def _walk(decoder: Decoder, trie: _Trie, in_step: bool, choose: Choose):
    """Descent of ``trie`` for every row, ``choose`` picking at each level: yields each level's
    (tokens, fed) (B,), feeding them. A row with nothing left to pick scores 0 everywhere (its pick
    is not fed)."""
    node = torch.zeros(decoder.mask.shape[0], dtype=torch.long, device=decoder.mask.device)
    for level in range(trie.depth):
        allowed = trie.tokens[node]
        fed = (allowed >= 0).any(-1)
        if level and all_finished(~fed, across_ranks=in_step):
            return
        scores = decoder.last_logits.gather(1, allowed.clamp(min=0)).masked_fill(allowed < 0, -torch.inf)
        pick = choose(scores.masked_fill(~fed[:, None], 0.0))[:, None]
        step = allowed.gather(1, pick).squeeze(1).clamp(min=0)
        node = torch.where(fed, trie.nodes[node].gather(1, pick).squeeze(1), node)
        yield step, fed
        decoder.feed(step[:, None], fed)


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
