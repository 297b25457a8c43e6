"""Scoring protocols (``eval.protocol``): the conventions by which grounding papers turn IoUs into R1@m
and mIoU. They move results by points, so each is a named switch, recorded in ``metrics.json``.

- ``exact`` (default): IoU on seconds, unrounded; R1@m counts IoU >= m (a tie within float noise
  too); an unparseable answer is IoU 0 and stays in the denominator (``parse_fail`` and ``coverage``
  say how many).
- ``vtimellm`` (VTimeLLM, TimeRefine): IoU on fractions of the duration, rounded half-up to 2
  decimals before thresholds and mean (0.695 counts at 0.7); >=.
- ``strict`` (Time-R1, UniTime): R1@m counts IoU > m.
- ``parsed_only`` (TRACE): unparseable answers leave the denominator; inflates scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grounding.metrics.iou import THRESHOLDS, temporal_iou


@dataclass(frozen=True)
class Protocol:
    """``on_fractions``: IoU of ``pred / duration`` and ``gt / duration``; ``decimals``: IoUs rounded
    half-up to that many decimals first; ``strict``: ``>`` thresholds; ``parsed_only``: only parsed
    answers in the denominator. ``warning``: what a reader of its scores must know."""

    name: str
    on_fractions: bool = False
    decimals: int | None = None
    strict: bool = False
    parsed_only: bool = False
    warning: str | None = None


EXACT = Protocol("exact")
PROTOCOLS = {
    protocol.name: protocol
    for protocol in (
        EXACT,
        Protocol("vtimellm", on_fractions=True, decimals=2),
        Protocol("strict", strict=True),
        Protocol(
            "parsed_only",
            parsed_only=True,
            warning="protocol parsed_only leaves unparseable answers out of the denominator: "
            "its scores are inflated by the parse-failure rate and are not comparable to the others",
        ),
    )
}


def protocol_named(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown scoring protocol {name!r}; choose from {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def round_half_up(values: torch.Tensor, decimals: int) -> torch.Tensor:
    """Decimal half-up rounding (0.695 -> 0.7, 0.685 -> 0.69), robust to binary representation:
    values are first snapped to 1e-6 of the last kept decimal, so 0.6949999999999999 counts as 0.695."""
    scaled = values.double() * 10**decimals
    snapped = torch.round(scaled * 1e6) / 1e6
    return torch.floor(snapped + 0.5) / 10**decimals


def protocol_iou(
    pred: torch.Tensor,
    target: torch.Tensor,
    duration: torch.Tensor,
    protocol: Protocol,
    iou: torch.Tensor | None = None,
) -> torch.Tensor:
    """Row-wise IoU of ``(N, 2)`` segments in seconds under ``protocol``; ``duration`` is ``(N,)``.
    ``NaN`` rows (unparseable answers) give 0. A given ``iou`` (several windows per query) is only
    rounded as the protocol says."""
    if iou is not None:
        return iou if protocol.decimals is None else round_half_up(iou, protocol.decimals)
    if protocol.on_fractions:
        scale = duration.double().unsqueeze(1)
        pred, target = pred.double() / scale, target.double() / scale
    iou = temporal_iou(pred, target)
    return iou if protocol.decimals is None else round_half_up(iou, protocol.decimals)


# An IoU this close to a threshold is on it: a tie in exact arithmetic can land either side in floats
# (IoU 7.7 / 15.4 s computes as 0.49999999999999994, which ``>=`` 0.5 would miss).
TIE = 1e-9


def hits(iou: torch.Tensor | float, threshold: float, protocol: Protocol) -> torch.Tensor | bool:
    """Whether each IoU (or one) counts for R1@``threshold`` (a tie within :data:`TIE` counts under
    ``>=``, not under ``>``)."""
    return iou > threshold + TIE if protocol.strict else iou >= threshold - TIE


def protocol_sums(
    pred: torch.Tensor,
    target: torch.Tensor,
    duration: torch.Tensor,
    protocol: Protocol,
    thresholds: tuple[float, ...] = THRESHOLDS,
    iou: torch.Tensor | None = None,
    unparsed: torch.Tensor | None = None,
    answered: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-batch float64 sums (IoU, queries, answers missing, texts that did not parse, hits per
    threshold) that add up exactly across batches and processes. ``unparsed``: each row's text did not
    parse (default: its answer is missing; the aux head may answer a text that did not parse).
    ``answered``: each row's query has an answer (default: its segment is not NaN); a NaN segment of
    an answered query (a step the answer did not reach) scores 0 and stays in the denominator."""
    iou = protocol_iou(pred, target, duration, protocol, iou)
    failed = torch.isnan(pred).any(dim=1) if answered is None else ~answered.bool()
    return {
        "iou": iou.sum(),
        "count": torch.tensor(float(iou.numel()), dtype=torch.float64),
        "failed": failed.sum().double(),
        "unparsed": (failed if unparsed is None else unparsed.bool()).sum().double(),
        **{f"R1@{t}": hits(iou, t, protocol).sum().double() for t in thresholds},
    }


def protocol_scores(sums: dict[str, torch.Tensor], protocol: Protocol) -> dict[str, float]:
    """Percent R1@m, mIoU and texts that did not parse from accumulated sums, plus ``count`` (queries
    seen). The denominator is every query, or only those answered under ``parsed_only``; 0 when empty."""
    count, failed = float(sums["count"]), float(sums["failed"])
    denominator = count - failed if protocol.parsed_only else count
    scale = 100.0 / denominator if denominator else 0.0
    scores = {key: float(value) * scale for key, value in sums.items() if key.startswith("R1@")}
    return {
        **scores,
        "mIoU": float(sums["iou"]) * scale,
        "parse_fail": 100.0 * float(sums["unparsed"]) / count if count else 0.0,
        "count": count,
    }
