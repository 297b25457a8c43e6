"""GRPO settings that were taken and did nothing (review): a reward or temperature that leaves every
group without signal is refused where a run trains (a saved run still loads); a gradient clipping
algorithm GRPO does not use is warned of."""

from __future__ import annotations

import re

import pytest
from omegaconf import OmegaConf

from tests.test_grpo import GRPO, supervised  # noqa: F401 (a fixture)
from timerefine.pipeline.config import ConfigError, idle_settings, load_run_config
from timerefine.pipeline.init_from_run import train_config
from timerefine.pipeline.previous_run import may_train

NO_SIGNAL = "so every answer of a group gets the same reward and no advantage is other than 0"


@pytest.mark.parametrize(
    ("given", "refusal"),
    [
        (["grpo.temperature=0"], "grpo.temperature=0 samples greedily: a group's answers are one answer"),
        (["grpo.reward=[format]"], "grpo.reward=[format] with grpo.constrained=true: every constrained"),
    ],
)
def test_no_signal_is_refused_where_a_run_trains(supervised, given, refusal, tmp_path):  # noqa: F811
    cfg = train_config([*GRPO, f"init_from_run={supervised}", f"output_dir={tmp_path / 'run'}", *given])
    with pytest.raises(ConfigError, match=f"{re.escape(refusal)}.*{NO_SIGNAL}"):
        may_train(cfg)
    OmegaConf.save(cfg, tmp_path / "config.yaml")  # where a run trains, not where a saved one loads
    assert load_run_config(tmp_path, []).grpo == cfg.grpo  # (review: evaluate and predict refused it)


@pytest.mark.parametrize("strategy", ["trainer=fsdp", "trainer.strategy=fsdp"])
def test_fsdp_is_refused_where_a_run_trains(supervised, strategy, tmp_path):  # noqa: F811
    """Before: the first step stopped on FSDP's assertion (a backward inside its root unit's forward)."""
    cfg = train_config([*GRPO, f"init_from_run={supervised}", f"output_dir={tmp_path / 'run'}", strategy])
    with pytest.raises(ConfigError, match=r"^grpo.enabled=true cannot train under FSDP .*; use trainer=ddp$"):
        may_train(cfg)


def test_their_neighbours_are_taken(supervised, tmp_path):  # noqa: F811
    run = [*GRPO, f"init_from_run={supervised}", f"output_dir={tmp_path}"]
    may_train(
        train_config([*run, "grpo.reward=[format]", "grpo.constrained=false"])
    )  # free answers may not parse
    may_train(train_config([*run, "grpo.reward=[iou,format]"]))


def test_a_clipping_algorithm_grpo_does_not_use_is_warned_of(supervised):  # noqa: F811
    given = [*GRPO, f"init_from_run={supervised}", "+trainer.gradient_clip_algorithm=value"]
    assert list(idle_settings(train_config(given), given)) == [
        "trainer.gradient_clip_algorithm=value is not read: GRPO clips the gradient norm "
        "(trainer.gradient_clip_val)"
    ]
