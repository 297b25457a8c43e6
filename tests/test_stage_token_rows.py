"""A later stage and the grounding tokens' rows (``model.trainable.token_rows``): a stage builds the
adapters of its start as they trained, rows included, and ``token_rows=false`` freezes those rows
(``continue``) or keeps them out of its new adapters (``merge``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import train
from lightning_modules.trainable import TOKEN_ROWS
from tests import helpers
from tests.test_stage_chains import lm_logits
from tests.test_stages import TINY, built
from timerefine.inference.grounder import Grounder
from timerefine.pipeline.config import ConfigError
from timerefine.pipeline.init_from_run import train_config
from timerefine.tools.export import main as export_main

NO_ROWS = "model.trainable.token_rows=false"


@pytest.fixture(scope="module")
def start(tmp_path_factory) -> Path:
    """A LoRA run on a pretrained LM that trained its token rows (the default)."""
    root = tmp_path_factory.mktemp("rows")
    helpers.pretrained_lm(root / "llama")
    lora = ["model.lora.enabled=true", f"model.lm.name_or_path={root / 'llama'}"]
    assert train.main([*TINY, *lora, f"output_dir={root / 'a'}"]) == 0
    return root / "a"


@pytest.fixture(scope="module")
def frozen_rows(start) -> Path:
    """B: continues the start's adapters with their token rows frozen."""
    given = ["model.lora.enabled=true", f"init_from_run={start}", NO_ROWS]
    assert train.main([*TINY, *given, f"output_dir={start.parent / 'b'}"]) == 0
    return start.parent / "b"


def token_rows(module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in module.model.lm.named_parameters() if TOKEN_ROWS in n}


def test_a_stage_judges_model_rules_on_the_settings_it_inherits(start, tmp_path, capsys):
    """Before: refused before inheriting, "model.trainable.token_rows=false needs lora.enabled=true",
    although the run it starts from has LoRA on."""
    assert train.main([*TINY, f"init_from_run={start}", NO_ROWS, f"output_dir={tmp_path / 'b'}"]) == 0
    assert "needs lora.enabled" not in capsys.readouterr().err


def test_a_missing_start_comes_with_the_refusals_no_start_changes():
    """Before: named alone. A model.* refusal waits for the start's settings (after a LoRA run,
    token_rows=false is fine), a data.batch_size one does not."""
    with pytest.raises(ConfigError) as error:
        train_config([*TINY, "init_from_run=/no", "data.batch_size=0", NO_ROWS])
    assert str(error.value) == (
        "init_from_run=/no: /no is not a run directory (config.yaml and checkpoints/); "
        "data.batch_size=0: must be an integer >= 1"
    )


@pytest.mark.slow
def test_a_continued_stage_freezes_the_rows_its_start_trained(start, frozen_rows, tmp_path):
    """Before: exit 2, "the checkpoint was trained on the base LM ... but the model was rebuilt from"
    it with another hash (the model was built without the rows that its start's checkpoint holds)."""
    b = Grounder.from_run(frozen_rows).run.module
    rows, trained = token_rows(b), token_rows(Grounder.from_run(start).run.module)
    assert rows and not any(p.requires_grad for p in rows.values())
    assert all(torch.equal(rows[n], trained[n]) for n in trained)
    assert any(p.requires_grad for n, p in b.model.lm.named_parameters() if "lora_" in n)
    # C continues B's adapters, which hold A's rows: its model is built with them too
    assert train.main([*TINY, f"init_from_run={frozen_rows}", f"output_dir={tmp_path / 'c'}"]) == 0


@pytest.mark.slow
def test_a_stage_that_froze_its_starts_rows_exports(frozen_rows, tmp_path):
    """Before: the export's config said token_rows=false, so it was rebuilt without the rows its
    weights hold (did not load); merged, "token_rows=false needs lora.enabled=true" (did not load)."""
    assert export_main([str(frozen_rows), str(tmp_path / "plain")]) == 0
    assert export_main([str(frozen_rows), str(tmp_path / "merged"), "--merge-lora"]) == 0
    run = Grounder.from_run(frozen_rows).run.module
    expected, plain = run.state_dict(), Grounder.from_export(tmp_path / "plain").run.module.state_dict()
    assert sorted(plain) == sorted(expected)
    assert [name for name in expected if not torch.equal(plain[name], expected[name])] == []
    merged = Grounder.from_export(tmp_path / "merged").run.module
    assert torch.allclose(lm_logits(merged), lm_logits(run), atol=1e-5)


@pytest.mark.slow
def test_a_merge_stage_without_rows_merges_those_its_start_trained(start):
    """Before: the same base-hash error."""
    stage = built([*TINY, f"init_from_run={start}", "model.lora.inherited=merge", NO_ROWS])
    assert not token_rows(stage)
    assert torch.allclose(lm_logits(stage), lm_logits(Grounder.from_run(start).run.module), atol=1e-6)


def test_continued_adapters_train_no_rows_they_were_made_without(start, tmp_path, capsys):
    """Rows a run's adapters were made without cannot train when they are continued."""
    without = tmp_path / "a"
    lm = [f"model.lm.name_or_path={start.parent / 'llama'}", "model.lora.enabled=true", NO_ROWS]
    assert train.main([*TINY, *lm, f"output_dir={without}"]) == 0
    given = [f"init_from_run={without}", "model.trainable.token_rows=true", f"output_dir={tmp_path / 'b'}"]
    assert train.main([*TINY, *given]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"config error: model.trainable.token_rows=true: the adapters of init_from_run={without} were trained without "
        "their token rows (model.trainable.token_rows=false) and model.lora.inherited=continue trains "
        "them on; set model.lora.inherited=merge for new adapters that train them"
    )
