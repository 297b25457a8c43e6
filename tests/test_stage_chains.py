"""Chains of more than two stages on a pretrained LM. A LoRA run leaves its frozen base out of its
checkpoints, so a stage that merged its start's adapters (``model.lora.inherited=merge``) holds a base
that only its chain of starts can rebuild: stage A trains adapters (with gradient checkpointing, which
the later stages take from it), B merges them and trains new ones, C continues B's, D merges C's."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import train
from tests import helpers
from tests.test_stages import TINY, built
from timerefine.inference.grounder import Grounder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chain")
    helpers.pretrained_lm(root / "llama")
    runs = {name: root / name for name in "abc"}
    lora = [
        "model.lora.enabled=true",
        f"model.lm.name_or_path={root / 'llama'}",
        "model.lm.gradient_checkpointing=true",
    ]
    assert train.main([*TINY, *lora, f"output_dir={runs['a']}"]) == 0
    merge = ["model.lora.inherited=merge", "model.lora.r=4"]
    assert train.main([*TINY, f"init_from_run={runs['a']}", *merge, f"output_dir={runs['b']}"]) == 0
    return runs


def lm_logits(module) -> torch.Tensor:
    ids = helpers.batch(n=2)["input_ids"].clamp(max=len(module.tokenizer) - 1)
    with torch.no_grad():
        return module.eval().model.lm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_a_stage_starts_from_a_run_that_merged_adapters(chain):
    """Before: refused ("its base LM holds the adapters it merged ... a run cannot start from it"), as
    the checkpoint of B leaves out the base with A's adapters merged into it. And C took B's own start,
    ``model.lora.inherited=merge``, instead of the default (continue)."""
    assert train.main([*TINY, f"init_from_run={chain['b']}", f"output_dir={chain['c']}"]) == 0
    assert OmegaConf.load(chain["c"] / "config.yaml").model.lora.inherited == "continue"
    start = built([*TINY, f"init_from_run={chain['b']}"])
    assert torch.allclose(lm_logits(start), lm_logits(Grounder.from_run(chain["b"]).run.module), atol=1e-6)


def stage_c(chain: dict[str, Path]) -> Path:
    """C, continuing B (trained by the first test, or now when it runs alone)."""
    if not (chain["c"] / "metrics.json").is_file():
        assert train.main([*TINY, f"init_from_run={chain['b']}", f"output_dir={chain['c']}"]) == 0
    return chain["c"]


def test_a_merge_after_a_continued_stage_rebuilds_the_base_it_continued_on(chain):
    """C continued B's adapters on B's base, which holds A's: merging C's into it rebuilds both. D's
    own gradient checkpointing applies (before: the rebuilt base kept A's)."""
    stage_c(chain)
    given = ["model.lora.inherited=merge", "model.lm.gradient_checkpointing=false"]
    start = built([*TINY, f"init_from_run={chain['c']}", *given])
    assert not start.model.lm.get_base_model().is_activation_checkpointing
    assert torch.allclose(lm_logits(start), lm_logits(Grounder.from_run(chain["c"]).run.module), atol=1e-6)


def test_a_chain_rebuilds_its_base_in_its_own_dtype(chain, tmp_path, capsys):
    """Before: C trained on B's float32 base while its config said bfloat16 (exit 0)."""
    given = [f"init_from_run={chain['b']}", "model.lm.dtype=bfloat16", f"output_dir={tmp_path / 'c'}"]
    assert train.main([*TINY, *given]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: model.lm.dtype=bfloat16: the base LM of init_from_run={chain['b']} holds merged "
        "adapters and is rebuilt as it was built, with model.lm.dtype=float32"
    )


def test_a_chain_without_its_first_run_says_which(chain, tmp_path, capsys):
    """Before, from C: the line named A alone, not the stages that lead to it."""
    c, gone = stage_c(chain), f"{chain['a']} is not a run directory (config.yaml and checkpoints/)"
    moved = shutil.move(chain["a"], tmp_path / "a")
    try:
        from_b = train.main([*TINY, f"init_from_run={chain['b']}", f"output_dir={tmp_path / 'c'}"])
        b_line = capsys.readouterr().err.strip().splitlines()[-1]
        from_c = train.main([*TINY, f"init_from_run={c}", f"output_dir={tmp_path / 'd'}"])
        c_line = capsys.readouterr().err.strip().splitlines()[-1]
    finally:
        shutil.move(moved, chain["a"])
    assert (from_b, from_c) == (2, 2)
    assert b_line == f"config error: init_from_run={chain['b']}: init_from_run={chain['a']}: {gone}"
    assert c_line == (
        f"config error: init_from_run={c}: init_from_run={chain['b']}: init_from_run={chain['a']}: {gone}"
    )


def test_a_grpo_stage_turns_off_the_dropout_of_the_adapters_it_adds(chain):
    """Before (review): ``grpo.disable_dropout`` ran before ``init_from_run`` added B's new adapters
    (``model.lora.inherited=merge``), whose dropout then differed between sampling, scoring and the KL."""
    grpo = ["experiment=grpo", *TINY[1:], "data.batch_size=4", "grpo.G=4", "model.lora.dropout=0.5"]
    policy = built([*grpo, f"init_from_run={chain['a']}", "model.lora.inherited=merge"]).model
    assert any("lora_dropout" in name for name, _ in policy.named_modules())  # new adapters were added
    assert [name for name, m in policy.named_modules() if isinstance(m, nn.Dropout) and m.p > 0] == []
