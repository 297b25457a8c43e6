"""GRPO settings that were taken and did nothing (review): a reward or temperature that leaves every
group without signal is refused; a gradient clipping algorithm GRPO does not use is warned of."""

from __future__ import annotations

import re

import pytest

from tests.test_grpo import GRPO, supervised  # noqa: F401 (a fixture)
from timerefine.pipeline.config import ConfigError, idle_settings
from timerefine.pipeline.init_from_run import train_config

NO_SIGNAL = "so every answer of a group gets the same reward and no advantage is other than 0"


@pytest.mark.parametrize(
    ("given", "refusal"),
    [
        (["grpo.temperature=0"], "grpo.temperature=0 samples greedily: a group's answers are one answer"),
        (["grpo.reward=[format]"], "grpo.reward=[format] with grpo.constrained=true: every constrained"),
    ],
)
def test_settings_that_leave_every_group_without_signal_are_refused(supervised, given, refusal):  # noqa: F811
    with pytest.raises(ConfigError, match=f"{re.escape(refusal)}.*{NO_SIGNAL}"):
        train_config([*GRPO, f"init_from_run={supervised}", *given])


def test_their_neighbours_are_taken(supervised):  # noqa: F811
    run = [*GRPO, f"init_from_run={supervised}"]
    train_config([*run, "grpo.reward=[format]", "grpo.constrained=false"])  # free answers may not parse
    train_config([*run, "grpo.reward=[iou,format]"])


def test_a_clipping_algorithm_grpo_does_not_use_is_warned_of(supervised):  # noqa: F811
    given = [*GRPO, f"init_from_run={supervised}", "+trainer.gradient_clip_algorithm=value"]
    assert list(idle_settings(train_config(given), given)) == [
        "trainer.gradient_clip_algorithm=value is not read: GRPO clips the gradient norm "
        "(trainer.gradient_clip_val)"
    ]
