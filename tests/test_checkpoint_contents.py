"""A checkpoint says what it is: the run's resolved config and its tokenizer travel inside it. It
holds what trains: a pretrained base's frozen weights stay out, identified by a hash, and come back
from the base when the checkpoint is loaded (resume, evaluate, predict); a randomly initialised LM,
which nothing can rebuild, is saved whole."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

import evaluate
import train
from lightning_modules.base_weights import IDENTITY
from lightning_modules.language_model import LMSpec, TinyLMSpec, build_language_model, build_tiny_lm
from lightning_modules.tokenizer import tokenizer_from_files, train_local_tokenizer
from tests.helpers import corpus
from timerefine.inference.grounder import Grounder
from timerefine.inference.run_loading import dataset_examples, load_run, predict
from timerefine.pipeline.build import build_datamodule, build_module
from timerefine.pipeline.config import load_config
from timerefine.tools.export import main as export_main


def test_a_checkpoint_holds_its_config_and_tokenizer_and_a_random_lm_whole(tmp_path):
    run = tmp_path / "run"
    overrides = ["experiment=tiny", "trainer.max_steps=4", "test=false", "model.lora.enabled=true"]
    assert train.main([*overrides, f"output_dir={run}"]) == 0
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)

    assert checkpoint["hyper_parameters"]["config"] == OmegaConf.to_container(
        OmegaConf.load(run / "config.yaml")
    )
    kept = tokenizer_from_files(checkpoint["tokenizer_files"], "kept")
    saved = AutoTokenizer.from_pretrained(run / "tokenizer")
    text = "From <SEG_START> 12 to 34 <OFFSET> +01 and -02 <SEG_END>. a person opens the door"
    assert kept.encode(text) == saved.encode(text)
    assert len(kept) == len(saved)
    # LoRA on a randomly initialised LM: its frozen weights cannot be rebuilt, so they are saved too.
    cfg = load_config([*overrides, f"output_dir={run}"])
    module = build_module(cfg, build_datamodule(cfg))
    assert IDENTITY not in checkpoint and checkpoint["state_dict"].keys() == module.state_dict().keys()


@dataclass(frozen=True)
class LoraRun:
    root: Path
    overrides: list[str]

    @property
    def run_dir(self) -> Path:
        return self.root / "run"


def save_tiny_base(folder: Path, seed: int) -> None:
    """A tiny 'pretrained' LM and its tokenizer, saved as a Hugging Face folder."""
    tokenizer = train_local_tokenizer(corpus(), 300)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    spec = TinyLMSpec(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    build_tiny_lm(spec, tokenizer).save_pretrained(folder)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> LoraRun:
    """LoRA on a saved 'pretrained' base, trained and tested."""
    root = tmp_path_factory.mktemp("pretrained")
    save_tiny_base(root / "base", seed=0)
    overrides = [
        "experiment=tiny",
        f"model.lm.name_or_path={root / 'base'}",
        "model.lora.enabled=true",
        "model.lora.r=2",
        "trainer.max_steps=6",
        "model.saliency.projector_steps=0",
        "trainer.val_check_interval=3",
        "callbacks.checkpoint.last_every_n_steps=3",
        "callbacks.checkpoint.save_top_k=-1",  # best-step3.ckpt stays: a resume point mid-run
        f"output_dir={root / 'run'}",
    ]
    assert train.main(overrides) == 0
    return LoraRun(root, overrides)


def test_a_lora_checkpoint_leaves_the_frozen_base_out(lora_run):
    checkpoint = torch.load(lora_run.run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    module = load_run(lora_run.run_dir, "last").module
    params = {n for n, _ in module.named_parameters(remove_duplicate=False)}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    buffers = set(module.state_dict()) - params
    assert set(checkpoint["state_dict"]) == trainable | buffers
    assert any("lora_A" in n for n in trainable) and any("trainable_tokens" in n for n in trainable)
    assert checkpoint[IDENTITY]["name"] == str(lora_run.root / "base")
    assert checkpoint[IDENTITY]["tensors"] == len(params - trainable)
    # What the checkpoint left out came back from the base.
    base = AutoModelForCausalLM.from_pretrained(lora_run.root / "base").state_dict()
    restored = module.state_dict()["model.lm.base_model.model.model.layers.1.mlp.up_proj.base_layer.weight"]
    assert torch.equal(restored, base["model.layers.1.mlp.up_proj.weight"])


def test_resume_evaluate_and_predict_from_a_lora_checkpoint_match_the_run(lora_run, tmp_path):
    def test_scores(metrics: Path) -> dict:
        return {k: v for k, v in json.loads(metrics.read_text()).items() if k.startswith("test/")}

    run_dir = lora_run.run_dir
    tested = test_scores(run_dir / "metrics.json")  # train.py tested its best checkpoint, read back from disk
    assert evaluate.main([str(run_dir), "--name", "again"]) == 0
    assert test_scores(run_dir / "eval" / "again" / "metrics.json") == tested

    rows = [json.loads(line) for line in (run_dir / "predictions" / "test.jsonl").read_text().splitlines()]
    run = load_run(run_dir, "best")
    examples = list(dataset_examples(run.cfg))
    features = torch.stack([torch.from_numpy(store.load(r.video_id)) for r, store in examples])
    found = predict(run, features, [r.query for r, _ in examples])
    assert [p.text for p in found] == [row["text"] for row in rows]

    # Continued from step 3 in another folder, the run ends with the weights of the run itself.
    continued = tmp_path / "continued"
    resume = f"resume={run_dir / 'checkpoints' / 'best-step3.ckpt'}"
    assert train.main([*lora_run.overrides, resume, f"output_dir={continued}"]) == 0
    ends = [
        torch.load(d / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        for d in (continued, run_dir)
    ]
    assert ends[0].keys() == ends[1].keys()
    for name, tensor in ends[1].items():
        torch.testing.assert_close(ends[0][name], tensor, rtol=0, atol=1e-6, msg=name)


def test_other_base_weights_are_refused_in_one_line_before_anything_is_written(lora_run, capsys):
    """The base folder now holds other weights under the same name: evaluate and resume refuse."""
    base, kept = lora_run.root / "base", lora_run.root / "base.kept"
    base.rename(kept)
    try:
        save_tiny_base(base, seed=1)
        capsys.readouterr()
        written = {p: p.read_bytes() for p in lora_run.run_dir.rglob("*") if p.is_file()}
        assert evaluate.main([str(lora_run.run_dir), "--name", "other"]) == 2
        assert train.main([*lora_run.overrides, "trainer.max_steps=9"]) == 2  # a resume
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert "Traceback" not in err and len(lines) == 2
        assert all("was trained on the base LM" in line and str(base) in line for line in lines)
        assert {p: p.read_bytes() for p in lora_run.run_dir.rglob("*") if p.is_file()} == written
    finally:
        shutil.rmtree(base)
        kept.rename(base)


def test_random_weights_take_the_architecture_and_the_seed_not_the_weights(tmp_path):
    save_tiny_base(tmp_path, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)

    def built(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        spec = LMSpec(str(tmp_path), weights="random")
        return build_language_model(tokenizer, spec, None).state_dict()

    base = AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()
    first, again, other = built(1), built(1), built(2)
    assert {n: t.shape for n, t in first.items()} == {n: t.shape for n, t in base.items()}
    assert all(torch.equal(first[n], again[n]) for n in first)
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(first[name], base[name]) and not torch.equal(first[name], other[name])


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (
            ["model.lm.weights=random", "model.lora.enabled=true"],
            "model.lm.weights=random needs lora.enabled=false",
        ),
        (
            ["model.lm.name_or_path=null", "model.lm.weights=random"],
            "model.lm.weights=random needs name_or_path",
        ),
        (["model.lm.weights=scratch"], "model.lm.weights=scratch: must be one of pretrained, random"),
    ],
)
def test_random_weights_are_refused_where_they_mean_nothing(tmp_path, capsys, overrides, key):
    save_tiny_base(tmp_path / "base", seed=0)
    capsys.readouterr()
    run = tmp_path / "run"
    base = [f"model.lm.name_or_path={tmp_path / 'base'}", "experiment=tiny", f"output_dir={run}"]
    assert train.main([*base, *overrides]) == 2
    err = capsys.readouterr().err
    assert key in err and len(err.strip().splitlines()) == 1 and not run.exists()


def test_a_random_base_trains_whole_is_saved_whole_and_reloads_to_the_same_predictions(tmp_path):
    save_tiny_base(tmp_path / "base", seed=0)
    run_dir = tmp_path / "run"
    overrides = [
        "experiment=tiny",
        f"model.lm.name_or_path={tmp_path / 'base'}",
        "model.lm.weights=random",
        "trainer.max_steps=4",
        "model.saliency.projector_steps=0",
        "trainer.val_check_interval=4",
        f"output_dir={run_dir}",
    ]
    assert train.main(overrides) == 0
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    run = load_run(run_dir, "last")
    assert all(p.requires_grad for n, p in run.module.named_parameters() if n.startswith("model.lm."))
    assert IDENTITY not in checkpoint and checkpoint["state_dict"].keys() == run.module.state_dict().keys()

    rows = [json.loads(line) for line in (run_dir / "predictions" / "test.jsonl").read_text().splitlines()]
    best = load_run(run_dir, "best")
    examples = list(dataset_examples(best.cfg))
    features = torch.stack([torch.from_numpy(store.load(r.video_id)) for r, store in examples])
    assert [p.text for p in predict(best, features, [r.query for r, _ in examples])] == [
        r["text"] for r in rows
    ]

    # An export has no base to take weights from either: it holds them all and predicts the same.
    from_run = Grounder.from_run(run_dir)
    source = from_run.run.cfg.data.source
    video = np.random.default_rng(0).normal(size=(source.num_frames, source.feature_dim)).astype(np.float32)
    expected = [a.as_json() for a in from_run.ground(video, ["a person opens the door"], duration=20.0)]
    assert export_main([str(run_dir), str(tmp_path / "export")]) == 0
    exported = Grounder.from_export(tmp_path / "export")
    assert [
        a.as_json() for a in exported.ground(video, ["a person opens the door"], duration=20.0)
    ] == expected
