"""A TimeRefine release written by PEFT itself the way the official training saves one, loaded with
``model.init_from``: the same logits and aux head output as the model that wrote it.

The official model (as read, not copied) is a Llama with ``segment_head`` (``Linear(hidden, 2)``,
sigmoid at ``<OFFSET>``) beside ``lm_head`` and ``model.mm_projector`` (stage 1, frozen). Its LoRA
config targets every linear layer but ``lm_head`` and lists ``segment_head`` in ``modules_to_save``,
so PEFT wraps the head. Two layouts come out of one training run:

- ``checkpoint``: a Trainer checkpoint (``checkpoint-N``, what the official evaluation loads), PEFT's
  ``save_pretrained`` of the whole model: LoRA, ``segment_head.*`` and the resized embedding matrices
  in ``adapter_model.safetensors``;
- ``final``: the end-of-training save: ``adapter_model.*`` with the LoRA tensors only, and
  ``non_lora_trainables.bin`` with every trainable non-LoRA parameter under its PEFT name
  (``base_model.model.segment_head.modules_to_save.default.*``, the embedding matrices).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from grounding.answer_format.tokens import OFFSET, REFERENCE_MARKERS, VIDEO_INDEX
from lightning_modules.grounding_module import GroundingModule
from lightning_modules.released_weights import without_prefix
from lightning_modules.tokenizer import train_local_tokenizer
from tests import helpers, real_tokenizers
from timerefine.pipeline.build import build_datamodule, build_module
from timerefine.pipeline.config import load_config

HIDDEN, FEATURES, FRAMES = 32, 24, 16


@dataclass
class Written:
    root: Path
    tokenizer: PreTrainedTokenizerBase
    input_ids: torch.Tensor  # (1, L); the frame positions hold 0
    frames: torch.Tensor  # (L,) bool
    features: torch.Tensor  # (FRAMES, FEATURES)
    logits: torch.Tensor  # (L, vocabulary)
    segment: torch.Tensor  # (2,): the aux head at <OFFSET>


def linear_names(model: nn.Module) -> list[str]:
    """The official LoRA targets: the last name of every Linear but ``lm_head``."""
    names = {name.split(".")[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    return sorted(names - {"lm_head"})


def write_release(root: Path, base: PreTrainedTokenizerBase, layout: str) -> Written:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(base),
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(root / "base")
    base.save_pretrained(root / "base")
    projector = nn.Linear(FEATURES, HIDDEN)
    (root / "stage1").mkdir()
    stage1 = {
        "model.mm_projector.weight": projector.weight.data,
        "model.mm_projector.bias": projector.bias.data,
    }
    torch.save(stage1, root / "stage1" / "mm_projector.bin")

    # The official training run: the head exists with the model, LoRA wraps it, tokens come after.
    model = LlamaForCausalLM.from_pretrained(root / "base")
    model.segment_head = nn.Linear(HIDDEN, 2)
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=linear_names(model),
        modules_to_save=["segment_head"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    tokenizer = copy.deepcopy(base)
    tokenizer.add_tokens(list(REFERENCE_MARKERS), special_tokens=True)
    model.resize_token_embeddings(len(tokenizer))
    model.base_model.model.model.mm_projector = projector.requires_grad_(False)  # stage 1's, frozen
    for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
        layer.weight.requires_grad_(True)  # the new rows train (so the release holds them)
    with torch.no_grad():  # "training": every trainable tensor moves
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    model.eval()

    folder = root / "release"
    model.save_pretrained(folder)
    if layout == "final":
        weights = load_file(folder / "adapter_model.safetensors")
        save_file({k: v for k, v in weights.items() if "lora_" in k}, folder / "adapter_model.safetensors")
        trainable = {
            k: v.detach().clone() for k, v in model.named_parameters() if "lora_" not in k and v.requires_grad
        }
        torch.save(trainable, folder / "non_lora_trainables.bin")

    text = [tokenizer.bos_token_id, *tokenizer.encode("a person opens the door", add_special_tokens=False)]
    answer = tokenizer.encode(
        "From <SEG_START> 12 to 34 <OFFSET> +05 and -03 <SEG_END>.", add_special_tokens=False
    )
    input_ids = torch.tensor([[*text, *[0] * FRAMES, *answer]])
    frames = torch.zeros(input_ids.shape[1], dtype=torch.bool)
    frames[len(text) : len(text) + FRAMES] = True
    features = torch.randn(FRAMES, FEATURES)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(input_ids)
        embeds[0, frames] = projector(features)
        out = model(inputs_embeds=embeds, output_hidden_states=True)
        offset = input_ids[0].tolist().index(tokenizer.convert_tokens_to_ids(OFFSET))
        segment = torch.sigmoid(model.base_model.model.segment_head(out.hidden_states[-1][0, offset]))
    return Written(root, tokenizer, input_ids, frames, features, out.logits[0], segment)


def base_tokenizer(name: str | None) -> PreTrainedTokenizerBase:
    if name is None:
        return train_local_tokenizer(helpers.corpus(), 300)
    if not real_tokenizers.path(name).is_dir():
        pytest.skip(f"real tokenizer {real_tokenizers.path(name)} absent")
    return AutoTokenizer.from_pretrained(real_tokenizers.path(name))


def build(written: Written) -> GroundingModule:
    cfg = load_config(
        [
            "experiment=tiny",
            "model.lm.grounding_tokens=reference",
            f"model.lm.name_or_path={written.root / 'base'}",
            f"model.init_from.projector={written.root / 'stage1' / 'mm_projector.bin'}",
            f"model.init_from.adapters=['{written.root / 'release'}']",
            "model.projector.kind=linear",
            "model.projector.temporal_embedding=none",
            "model.projector.frames_per_token=1",
            "model.projector.query_conditioned=false",
            "model.saliency.weight=0",
            "model.aux.head=linear",
            f"data.source.feature_dim={FEATURES}",
            f"data.source.num_frames={FRAMES}",
            f"output_dir={written.root / 'run'}",
        ]
    )
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    return build_module(cfg, datamodule)


@pytest.mark.parametrize("layout", ["checkpoint", "final"])
@pytest.mark.parametrize("tokenizer", [None, "llama2_spm"], ids=["local", "vicuna-vocabulary"])
def test_a_peft_written_release_loads_with_the_writers_logits(layout, tokenizer, tmp_path):
    written = write_release(tmp_path, base_tokenizer(tokenizer), layout)
    if layout == "final":
        non_lora = torch.load(tmp_path / "release" / "non_lora_trainables.bin")
        assert "base_model.model.segment_head.modules_to_save.default.weight" in non_lora
        assert not any(
            "segment_head" in k for k in load_file(tmp_path / "release" / "adapter_model.safetensors")
        )
    else:
        assert "base_model.model.segment_head.weight" in load_file(
            tmp_path / "release" / "adapter_model.safetensors"
        )
    module = build(written)
    model, ours = module.model.eval(), module.tokenizer
    # The reference style numbers the tokens as the release does: its rows land on the same ids.
    assert ours.get_added_vocab() == written.tokenizer.get_added_vocab() and len(ours) == len(
        written.tokenizer
    )
    if tokenizer == "llama2_spm":
        assert ours.convert_tokens_to_ids(list(REFERENCE_MARKERS)) == [32000, 32001, 32002, 32003]
    ids = written.input_ids.masked_fill(written.frames, VIDEO_INDEX)
    with torch.no_grad():
        out = model.lm(inputs_embeds=model.embed(ids, written.features[None]), output_hidden_states=True)
        offset = ids[0].tolist().index(ours.convert_tokens_to_ids(OFFSET))
        segment, _ = model.aux_head(out.hidden_states[-1][0, offset][None])
    assert torch.allclose(out.logits[0], written.logits, atol=1e-5)
    assert torch.allclose(segment[0], written.segment, atol=1e-6)


def test_the_wrappers_original_module_is_left_out_and_the_trained_copy_kept():
    file = Path("non_lora_trainables.bin")
    state = {
        "base_model.model.segment_head.original_module.weight": torch.zeros(2, 4),
        "base_model.model.segment_head.modules_to_save.default.weight": torch.ones(2, 4),
        "base_model.model.model.embed_tokens.weight": torch.ones(3, 4),
    }
    assert without_prefix(state, file).keys() == {"segment_head.weight", "model.embed_tokens.weight"}
    assert without_prefix(state, file)["segment_head.weight"].eq(1).all()
