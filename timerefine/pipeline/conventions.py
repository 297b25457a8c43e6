"""The published conventions a run follows, read from its config: the timeline (``data.timeline``) and
the scoring protocol (``eval.protocol``); both are recorded in ``metrics.json``."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from grounding.answer_format.timeline import Timeline, timeline_named
from grounding.metrics.protocols import Protocol, protocol_named

log = logging.getLogger(__name__)


def run_timeline(cfg: DictConfig) -> Timeline:
    return timeline_named(cfg.data.timeline)


def run_protocol(cfg: DictConfig) -> Protocol:
    """The scoring protocol; one that inflates scores says so in the log."""
    protocol = protocol_named(cfg.eval.protocol)
    if protocol.warning:
        log.warning(protocol.warning)
    return protocol


def recorded_conventions(cfg: DictConfig) -> dict[str, str]:
    """The ``metrics.json`` entries that say how the scores were computed."""
    return {"eval/protocol": cfg.eval.protocol, "data/timeline": cfg.data.timeline}
