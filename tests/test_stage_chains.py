"""Chains of more than two stages on a pretrained LM. A LoRA run leaves its frozen base out of its
checkpoints, so a stage that merged its start's adapters (``model.lora.inherited=merge``) holds a base
that only its chain of starts can rebuild: stage A trains adapters, B merges them and trains new ones,
C continues B's, D merges C's."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import train
from tests import helpers
from tests.test_stages import TINY, built, pretrained
from timerefine.inference.grounder import Grounder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chain")
    pretrained(root / "llama")
    runs = {name: root / name for name in "abc"}
    lora = ["model.lora.enabled=true", f"model.lm.name_or_path={root / 'llama'}"]
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
    the checkpoint of B leaves out the base with A's adapters merged into it."""
    assert train.main([*TINY, f"init_from_run={chain['b']}", f"output_dir={chain['c']}"]) == 0
    start = built([*TINY, f"init_from_run={chain['b']}"])
    assert torch.allclose(lm_logits(start), lm_logits(Grounder.from_run(chain["b"]).run.module), atol=1e-6)


def test_a_merge_after_a_continued_stage_rebuilds_the_base_it_continued_on(chain):
    """C continued B's adapters on B's base, which holds A's: merging C's into it rebuilds both."""
    if not (chain["c"] / "metrics.json").is_file():
        assert train.main([*TINY, f"init_from_run={chain['b']}", f"output_dir={chain['c']}"]) == 0
    start = built([*TINY, f"init_from_run={chain['c']}", "model.lora.inherited=merge"])
    assert torch.allclose(lm_logits(start), lm_logits(Grounder.from_run(chain["c"]).run.module), atol=1e-6)


def test_a_chain_without_its_first_run_says_which(chain, tmp_path, capsys):
    moved = shutil.move(chain["a"], tmp_path / "a")
    try:
        code = train.main([*TINY, f"init_from_run={chain['b']}", f"output_dir={tmp_path / 'c'}"])
    finally:
        shutil.move(moved, chain["a"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"config error: init_from_run={chain['b']}: init_from_run={chain['a']}: {chain['a']} is not a run "
        "directory (config.yaml and checkpoints/)"
    )
