"""Constrained decoding as a Hugging Face ``LogitsProcessor``: ``generate()`` may write only what the
answer layout (the codec's slots) allows next, then the end token.

The slots become one automaton over tokens: a fixed slot is a chain of states with one allowed
token each; a choice slot is its choices' token trie, whose leaves lead to the next slot (as in the
project's decoder, a choice that is the prefix of another is never picked on its own). Each row
walks it by the tokens it wrote, so rows whose picks differ in length simply move on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LogitsProcessor

from grounding.answer_format.slots import Slot


def layout_automaton(slots: Sequence[Slot], end_id: int) -> list[dict[int, int]]:
    """Each state's allowed tokens and the states they lead to; state 0 starts the answer, the last
    state (after the end token) allows the end token and stays."""
    states: list[dict[int, int]] = [{}]
    current = 0
    for slot in slots:
        if slot.fixed:
            for token in slot.fixed:
                states[current][token] = len(states)
                current = len(states)
                states.append({})
            continue
        trie: list[dict[int, int]] = [{}]
        for choice in slot.choices:
            node = 0
            for token in choice:
                if token not in trie[node]:
                    trie[node][token] = len(trie)
                    trie.append({})
                node = trie[node][token]
        after = len(states)
        states.append({})
        state_of = {0: current}
        for node in range(1, len(trie)):
            if trie[node]:
                state_of[node] = len(states)
                states.append({})
            else:
                state_of[node] = after
        for node, children in enumerate(trie):
            states[state_of[node]] = {token: state_of[child] for token, child in children.items()}
        current = after
    done = len(states)
    states[current] = {end_id: done}
    return [*states, {end_id: done}]


class SlotLogitsProcessor(LogitsProcessor):
    """Masks every token the layout of ``slots`` does not allow next (the end token once it is
    complete). ``input_ids`` must hold only the answer written so far (``generate(inputs_embeds=...)``
    without ``input_ids``); greedy or sampled decoding, one row per answer (no beams).

    One instance serves one ``generate()`` call at a time: it advances each row's state by the
    tokens added since its last call, and starts over when the answers are shorter than before. A
    token the layout does not allow (the padding after the end token) leaves a row where it is.
    """

    def __init__(self, slots: Sequence[Slot], end_id: int) -> None:
        states = layout_automaton(slots, end_id)
        width = max(map(len, states))
        # Rows padded with their first token (and its next state): a repeat changes no score.
        self._tokens = torch.tensor([[*s, *[next(iter(s))] * (width - len(s))] for s in states])
        nexts = [list(s.values()) for s in states]
        self._nexts = torch.tensor([[*n, *[n[0]] * (width - len(n))] for n in nexts])
        self.max_new_tokens = sum(slot.length for slot in slots) + 1  # the longest answer and its end
        self._state: torch.Tensor | None = None
        self._seen = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._tokens.device != input_ids.device:
            self._tokens, self._nexts = self._tokens.to(input_ids.device), self._nexts.to(input_ids.device)
        if self._state is None or input_ids.shape[1] < self._seen or len(self._state) != len(input_ids):
            self._state, self._seen = input_ids.new_zeros(len(input_ids)), 0
        for column in range(self._seen, input_ids.shape[1]):
            self._state = self._advance(self._state, input_ids[:, column])
        self._seen = input_ids.shape[1]
        allowed = self._tokens[self._state]
        masked = torch.full_like(scores, -torch.inf)
        return masked.scatter_(1, allowed, scores.gather(1, allowed))

    def _advance(self, state: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        hit = self._tokens[state] == token[:, None]
        following = self._nexts[state].gather(1, hit.int().argmax(1, keepdim=True)).squeeze(1)
        return torch.where(hit.any(1), following, state)
