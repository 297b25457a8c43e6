"""Small from-config LMs of real families (Llama untied, Qwen2 tied) with real vocabularies: LoRA on
every linear layer, the grounding tokens' input and output rows trainable, new rows from the mean,
gradient checkpointing, bf16 autocast on CPU, and a Lightning checkpoint that reloads to the same
predictions."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, PreTrainedTokenizerBase

import train
from grounding.answer_format.codec import AnswerCodec
from grounding.answer_format.targets import RefineSchedule
from grounding.answer_format.tokens import VIDEO
from lightning_modules.aux_head import AuxHead
from lightning_modules.decoding import InferenceSpec
from lightning_modules.grounding_module import GroundingModule
from lightning_modules.language_model import (
    LMSpec,
    LoraSpec,
    TinyLMSpec,
    build_language_model,
    build_tiny_lm,
    grounding_token_ids,
    token_rows_merged,
)
from lightning_modules.optimization import OptimSpec
from lightning_modules.projector import FrameProjector
from lightning_modules.tokenizer import add_grounding_tokens, train_local_tokenizer
from lightning_modules.video_llm import VideoLLM
from tests import helpers

TOKENIZERS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tokenizers"
# (arch, tied embeddings, tokenizer folder or None for the local BPE): the families as released.
FAMILIES = [
    ("llama", False, None),
    ("qwen2", True, None),
    ("llama", False, "llama2_spm"),
    ("qwen2", True, "qwen2"),
]
IDS = ["llama-local", "qwen2-tied-local", "llama-llama2_spm", "qwen2-tied-qwen2"]
LORA = LoraSpec(r=4, alpha=8, dropout=0.0)


def base_tokenizer(folder: str | None) -> PreTrainedTokenizerBase:
    """A real tokenizer's base vocabulary (skipped when the folder is absent), or the local BPE."""
    if folder is None:
        return train_local_tokenizer(helpers.corpus(), 300)
    path = TOKENIZERS / folder
    if not path.is_dir():
        pytest.skip(f"real tokenizer {path} absent")
    return AutoTokenizer.from_pretrained(path)


def tiny(arch: str, tied: bool) -> TinyLMSpec:
    return TinyLMSpec(
        arch, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, tie_word_embeddings=tied
    )


def row_weights(lm: torch.nn.Module, vocabulary: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The input and output rows the LM computes with (through any peft wrapper), (vocabulary, hidden)."""
    with torch.no_grad():
        inputs = lm.get_input_embeddings()(torch.arange(vocabulary))
        outputs = lm.get_output_embeddings()(torch.eye(lm.config.hidden_size)).T[:vocabulary]
    return inputs.clone(), outputs.clone()


@pytest.mark.parametrize(("arch", "tied", "folder"), FAMILIES, ids=IDS)
def test_lora_trains_the_grounding_rows_of_the_input_and_output_embeddings(arch, tied, folder):
    tokenizer = add_grounding_tokens(base_tokenizer(folder))
    torch.manual_seed(0)
    lm = build_language_model(tokenizer, LMSpec(tiny=tiny(arch, tied)), LORA)
    assert lm.config.vocab_size == len(tokenizer)
    vocabulary, grounding = len(tokenizer), grounding_token_ids(tokenizer)
    inputs_before, outputs_before = row_weights(lm, vocabulary)

    optimizer = torch.optim.SGD([p for p in lm.parameters() if p.requires_grad], lr=1.0)
    ids = torch.tensor([[tokenizer.bos_token_id or 0, *grounding, 5, 6, *grounding]])
    lm(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()

    inputs_after, outputs_after = row_weights(lm, vocabulary)
    for before, after in ((inputs_before, inputs_after), (outputs_before, outputs_after)):
        changed = set((after != before).any(dim=1).nonzero().flatten().tolist())
        assert changed == set(grounding)
    if tied:
        assert torch.equal(inputs_after, outputs_after)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_merging_the_token_rows_for_decoding_changes_no_logit_and_no_weight(tied):
    """Decoding runs with the trained token rows merged (token_rows_merged): the same logits as peft's
    per-forward copy, and every tensor bit-identical afterwards, so training goes on as it would."""
    tokenizer = helpers.tokenizer()
    torch.manual_seed(0)
    lm = build_language_model(tokenizer, LMSpec(tiny=tiny("qwen2", tied)), LORA)
    layers = [m for m in lm.modules() if isinstance(m, TrainableTokensLayer)]
    assert layers
    with torch.no_grad():
        for p in lm.parameters():
            if p.requires_grad:
                p.normal_(std=0.5)  # trained rows and adapters that differ from the base
    ids = torch.tensor([[5, *grounding_token_ids(tokenizer), 7]])
    before = {n: t.clone() for n, t in lm.state_dict().items()}
    with torch.no_grad():
        expected = lm(input_ids=ids).logits
        with token_rows_merged(lm):
            assert all(layer.merged for layer in layers)
            merged = lm(input_ids=ids).logits
    assert torch.equal(merged, expected)
    assert not any(layer.merged for layer in layers)
    after = lm.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)


def adapted_layers(lm: torch.nn.Module) -> set[str]:
    return {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in lm.named_parameters() if ".lora_A" in n}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lora_targets_every_linear_layer_of_the_lm_but_its_output_layer_by_default(arch):
    lm = build_language_model(helpers.tokenizer(), LMSpec(tiny=tiny(arch, False)), LoraSpec())
    adapted = adapted_layers(lm)
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    explicit = build_language_model(
        helpers.tokenizer(), LMSpec(tiny=tiny(arch, False)), LoraSpec(target_modules=["q_proj"])
    )
    assert adapted_layers(explicit) == {"q_proj"}


@pytest.mark.parametrize(("arch", "tied", "folder"), FAMILIES, ids=IDS)
@pytest.mark.parametrize("padded", [False, True], ids=["resized", "padded"])
def test_a_pretrained_lm_starts_its_new_token_rows_at_the_mean_of_the_others(
    tmp_path, arch, tied, folder, padded
):
    """Rows added by resizing, or padding rows the checkpoint already had (Qwen2 checkpoints have more
    rows than tokens), both start at the mean of the base vocabulary's rows."""
    base = base_tokenizer(folder)
    spec = tiny(arch, tied)
    torch.manual_seed(0)
    pretrained = build_tiny_lm(spec, base)
    if padded:
        pretrained.resize_token_embeddings(len(base) + 16, mean_resizing=False)
    pretrained.save_pretrained(tmp_path)
    tokenizer = add_grounding_tokens(base_tokenizer(folder))
    lm = build_language_model(tokenizer, LMSpec(str(tmp_path), tiny=spec), None)

    inputs, outputs = row_weights(lm, len(tokenizer))
    base_inputs, base_outputs = row_weights(pretrained, len(base))
    grounding = grounding_token_ids(tokenizer)
    assert min(grounding) >= len(base)
    for rows, base_rows in ((inputs, base_inputs), (outputs, base_outputs)):
        assert torch.equal(rows[: len(base)], base_rows)
        assert torch.allclose(rows[grounding], base_rows.mean(0).expand(len(grounding), -1), atol=1e-7)
    assert lm.get_input_embeddings().num_embeddings == max(len(tokenizer), len(base) + 16 * padded)
    assert (lm.get_input_embeddings().weight is lm.get_output_embeddings().weight) == tied


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_pretrained_lm_is_built_in_training_mode(tmp_path, lora):
    """from_pretrained returns a model in eval mode; trained so, its dropout would silently stay off."""
    base = base_tokenizer(None)
    build_tiny_lm(tiny("llama", False), base).save_pretrained(tmp_path)
    tokenizer = add_grounding_tokens(base_tokenizer(None))
    lm = build_language_model(
        tokenizer, LMSpec(str(tmp_path), tiny=tiny("llama", False)), LORA if lora else None
    )
    assert [name for name, module in lm.named_modules() if not module.training] == []


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gradient_checkpointing_with_lora_gives_the_same_gradients_under_bf16_autocast(arch):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        spec = LMSpec(tiny=tiny(arch, arch == "qwen2"), gradient_checkpointing=checkpointing)
        lm = build_language_model(helpers.tokenizer(), spec, LORA)
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)  # a non-zero adapter, so every LoRA matrix gets a gradient
        lm.train()
        ids = helpers.batch(refine_steps=1, n=2)["input_ids"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = lm(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append({n: p.grad for n, p in lm.named_parameters() if p.requires_grad})
        assert lm.is_activation_checkpointing == checkpointing
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert grad is not None and grad.abs().sum() > 0, name
        assert torch.allclose(grad, grads[1][name], rtol=1e-2, atol=1e-4), name


def module(arch: str, tied: bool, seed: int) -> GroundingModule:
    """LoRA + trainable rows, a projector and a linear aux head on a tiny family LM."""
    tokenizer, schedule = helpers.tokenizer(), RefineSchedule(steps=1)
    torch.manual_seed(seed)
    lm = build_language_model(tokenizer, LMSpec(tiny=tiny(arch, tied)), LORA)
    model = VideoLLM(
        lm,
        FrameProjector("linear", helpers.SPEC.feature_dim, 32),
        tokenizer.convert_tokens_to_ids(VIDEO),
        AuxHead(32, "linear", "l1"),
    )
    codec = AnswerCodec(tokenizer, schedule)
    return GroundingModule(model, codec, 1.0, OptimSpec(lr=0.05, warmup_steps=1), InferenceSpec(final="mean"))


@pytest.mark.parametrize(("arch", "tied"), [("llama", False), ("qwen2", True)], ids=["llama", "qwen2-tied"])
def test_adapters_rows_projector_and_aux_head_reload_to_identical_predictions(tmp_path, arch, tied):
    trained = module(arch, tied, seed=0)
    data = helpers.dataset()
    loader = DataLoader([data[(0, i)] for i in range(8)], batch_size=4, collate_fn=helpers.collator(1))
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(trained, train_dataloaders=loader)
    trainer.save_checkpoint(tmp_path / "model.ckpt")

    batch = helpers.batch(refine_steps=1, n=3, split="val")
    fresh = module(arch, tied, seed=1).eval()
    trained.eval()
    assert not torch.equal(fresh.model.projector.net.weight, trained.model.projector.net.weight)
    fresh.load_state_dict(torch.load(tmp_path / "model.ckpt", weights_only=False)["state_dict"])
    with torch.no_grad():
        logits = [
            m.model(batch["input_ids"], batch["attention_mask"], batch["features"]).logits
            for m in (trained, fresh)
        ]
    assert torch.equal(logits[0], logits[1])
    assert fresh.predict_batch(batch) == trained.predict_batch(batch)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_tiny_run_trains_with_lora_gradient_checkpointing_and_bf16_autocast_on_cpu(tmp_path, arch):
    code = train.main(
        [
            "experiment=tiny",
            "trainer=cpu",
            "trainer.precision=bf16-mixed",
            "trainer.max_steps=6",
            "model.saliency.projector_steps=0",
            "trainer.val_check_interval=3",
            "data.source.num_val=4",
            "data.source.num_test=4",
            f"model.lm.tiny.arch={arch}",
            f"model.lm.tiny.tie_word_embeddings={str(arch == 'qwen2').lower()}",
            "model.lm.gradient_checkpointing=true",
            "model.lora.enabled=true",
            "model.lora.r=4",
            "model.lm.tokenizer_vocab_size=300",
            f"output_dir={tmp_path}",
        ]
    )
    assert code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["global_step"] == 6 and 0 <= metrics["test/mIoU"] <= 100
