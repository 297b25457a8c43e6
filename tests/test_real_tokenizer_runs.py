"""A short ``train.py`` run (20 steps, K=3, aux head on, tiny LM) with each real tokenizer, its
embeddings sized to that vocabulary: Llama-2 with VTimeLLM's ``vicuna_v1`` chat, Qwen2 with its own
chat template, Llama-3 and GPT-2 plain; two of them with canonical answer tokens. The Qwen2 run is
evaluated again from its run directory (saved tokenizer, chat template and config)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from grounding.answer_format.layout import parse_answer, spaced
from tests import launched, real_tokenizers

pytestmark = [real_tokenizers.needs_tokenizers, pytest.mark.slow]
RUNS = {
    "llama2_spm": ["data.chat_template=vicuna_v1"],
    "llama3_bpe": ["model.answer_tokens=canonical"],
    "qwen2": ["data.chat_template=tokenizer", "model.answer_tokens=canonical"],
    "gpt2": [],
}
STEPS = 20


@dataclass
class Run:
    name: str
    output_dir: Path
    metrics: dict


def run(script: str, *args: str) -> None:
    result = launched.run([script, *args], timeout=500)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Run]:
    """Each tokenizer's run, trained on first use."""

    class Runs(dict):
        def __missing__(self, name: str) -> Run:
            output_dir = tmp_path_factory.mktemp(name) / "run"
            run(
                "train.py",
                "experiment=tiny",
                f"model.lm.tokenizer={real_tokenizers.path(name)}",
                *RUNS[name],
                f"trainer.max_steps={STEPS}",
                "model.saliency.projector_steps=0",
                f"trainer.val_check_interval={STEPS}",
                "trainer.enable_progress_bar=false",
                f"output_dir={output_dir}",
            )
            self[name] = Run(name, output_dir, json.loads((output_dir / "metrics.json").read_text()))
            return self[name]

    return Runs()


@pytest.fixture(params=list(RUNS))
def trained(request, runs) -> Run:
    return runs[request.param]


def test_the_run_trains_and_tests_every_refinement_step(trained):
    metrics = trained.metrics
    assert metrics["global_step"] == STEPS
    assert metrics["test/parse_fail"] == 0 and metrics["test/coverage"] == 100
    for key in ("test/mIoU", "test/aux/mIoU", *(f"test/step{k}/mIoU" for k in range(5))):
        assert 0 <= metrics[key] <= 100


def test_the_run_keeps_the_real_tokenizer_and_its_choices(trained):
    cfg = OmegaConf.load(trained.output_dir / "config.yaml")
    assert cfg.model.lm.tokenizer == str(real_tokenizers.path(trained.name))
    saved = AutoTokenizer.from_pretrained(trained.output_dir / "tokenizer")
    assert len(saved) == len(real_tokenizers.shared(trained.name))
    assert (trained.output_dir / "tokenizer" / "chat_template.jinja").exists() == (trained.name == "qwen2")
    rows = [json.loads(line) for line in (trained.output_dir / "predictions" / "test.jsonl").open()]
    assert rows and all(len(parse_answer(spaced(row["text"]))) == 4 for row in rows)


def test_evaluating_the_qwen2_run_again_gives_its_scores(runs):
    trained = runs["qwen2"]
    run("evaluate.py", str(trained.output_dir), "trainer.enable_progress_bar=false")
    again = json.loads((trained.output_dir / "eval" / "test" / "metrics.json").read_text())
    assert again["test/mIoU"] == pytest.approx(trained.metrics["test/mIoU"])
