"""The conventions a run follows, read from its config: the timeline (``data.timeline``), the scoring
protocol (``eval.protocol``), how a query of several windows scores (``data.source.multi_window``) and
the precision ``trainer.precision`` gives on this machine; all are recorded in ``metrics.json``."""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf

from grounding.answer_format.timeline import Timeline, timeline_named
from grounding.metrics.protocols import Protocol, protocol_named
from timerefine.pipeline.precision import PrecisionChoice, resolve_precision

log = logging.getLogger(__name__)


def run_timeline(cfg: DictConfig) -> Timeline:
    return timeline_named(cfg.data.timeline)


def run_protocol(cfg: DictConfig) -> Protocol:
    """The scoring protocol; one that inflates scores says so in the log."""
    protocol = protocol_named(cfg.eval.protocol)
    if protocol.warning:
        log.warning(protocol.warning)
    return protocol


def tiny_lm_width(cfg: DictConfig) -> int | None:
    """The hidden size of the run's tiny LM; None when the run's LM is a pretrained one."""
    return None if cfg.model.lm.name_or_path else int(cfg.model.lm.tiny.hidden_size)


def run_precision(cfg: DictConfig) -> PrecisionChoice:
    """What ``trainer.precision`` (``auto`` or a Lightning value) gives on this machine, and why."""
    trainer = cfg.trainer
    return resolve_precision(trainer.precision, trainer.accelerator, tiny_lm_width(cfg), cfg.model.lm.dtype)


def recorded_conventions(cfg: DictConfig) -> dict[str, str]:
    """The ``metrics.json`` entries that say how the scores were computed."""
    precision = run_precision(cfg)
    multi_window = OmegaConf.select(cfg, "data.source.multi_window")  # datasets of several windows a query
    return {
        "eval/protocol": cfg.eval.protocol,
        "data/timeline": cfg.data.timeline,
        **({"data/multi_window": multi_window} if multi_window else {}),
        "trainer/precision": precision.precision,
        "trainer/precision_reason": precision.reason,
    }
