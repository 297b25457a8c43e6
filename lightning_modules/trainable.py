"""Which parts of the Video LLM train (``model.trainable``), and the parameter summary that lists them."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lightning_modules.video_llm import VideoLLM

LORA, TOKEN_ROWS = "lora_", "trainable_tokens"  # peft's names for adapters and for trainable token rows


@dataclass(frozen=True)
class TrainableSpec:
    """``projector``: the frame projector (with its query conditioning and temporal embedding) and
    the digit gate; ``token_rows``: the grounding tokens' input and output rows (under LoRA; without
    it the whole LM trains); ``aux_head``: the aux head. Off freezes them as they start (e.g. a
    released stage-1 projector, or the head of an earlier stage); a frozen aux head's loss still trains
    what feeds it (``model.aux.weight=0`` stops that)."""

    projector: bool = True
    token_rows: bool = True
    aux_head: bool = True


def apply_trainable(model: VideoLLM, spec: TrainableSpec) -> None:
    """Freeze the projector and the aux head unless ``spec`` trains them, and token rows that the LM
    was built with (``apply_lora``; a later stage's adapters have the rows of its start) unless it does."""
    for part, trains in ((model.projector, spec.projector), (model.aux_head, spec.aux_head)):
        for param in part.parameters() if part is not None else ():
            param.requires_grad_(trains)
    for name, param in model.lm.named_parameters():
        if TOKEN_ROWS in name and not spec.token_rows:
            param.requires_grad_(False)
    if model.digit_gate is not None:
        model.digit_gate.requires_grad_(spec.projector)


def holds_token_rows(lm: nn.Module) -> bool:
    """Whether ``lm`` has peft's layers of trainable token rows (``apply_lora`` with token ids)."""
    return any(TOKEN_ROWS in name for name, _ in lm.named_parameters())


def part_of(name: str) -> str:
    """The part of the Video LLM a parameter name belongs to."""
    if name.startswith("lm."):
        return "LoRA adapters" if LORA in name else "token rows" if TOKEN_ROWS in name else "language model"
    if name.startswith("projector.") or name == "digit_gate":
        return "projector"
    return {"aux_head": "aux head", "saliency_head": "saliency head"}.get(name.split(".")[0], name)


def parameter_summary(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(trainable, total) parameter counts per part, in the order the parts come."""
    counts: dict[str, tuple[int, int]] = {}
    for name, param in model.named_parameters():
        trainable, total = counts.get(part_of(name), (0, 0))
        counts[part_of(name)] = (trainable + param.numel() * param.requires_grad, total + param.numel())
    return counts


def summary_lines(counts: dict[str, tuple[int, int]]) -> list[str]:
    """One line per part: trains / frozen / partly, with the counts."""
    lines = []
    for part, (trainable, total) in counts.items():
        state = "trains" if trainable == total else "frozen" if trainable == 0 else "partly trains"
        lines.append(f"{part:<16} {state:<14} {trainable:>13,} of {total:>13,}")
    return lines
