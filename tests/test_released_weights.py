"""Released VTimeLLM / TimeRefine weights: files of exactly the official layout, written here from a tiny
Llama, load through ``model.init_from`` into a fresh model of this framework with the same logits."""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

import train
from grounding.answer_format.tokens import OFFSET, RETHINK, SEG_END, SEG_START, VIDEO
from lightning_modules.grounding_module import GroundingModule
from lightning_modules.released_weights import RELEASED_TOKENS, ReleasedWeightsError
from lightning_modules.tokenizer import train_local_tokenizer
from tests import helpers
from timerefine.pipeline.build import build_datamodule, build_module
from timerefine.pipeline.config import load_config

TOKENIZERS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tokenizers"
HIDDEN, FEATURES, FRAMES = 32, 24, 16
LAYERS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Release:
    """The official files, the release's tokenizer, and what the released model computes."""

    root: Path
    tokenizer: PreTrainedTokenizerBase  # base vocabulary + RELEASED_TOKENS, in the official order
    input_ids: torch.Tensor  # (1, L) in the release's numbering; the frame positions hold 0
    frames: torch.Tensor  # (L,) bool
    features: torch.Tensor  # (FRAMES, FEATURES)
    logits: torch.Tensor  # (L, vocabulary of the release)
    segment: torch.Tensor  # (2,): the aux head at <OFFSET>

    def overrides(self, *extra: str) -> list[str]:
        adapters = ",".join(f"'{self.root / stage}'" for stage in ("stage2", "stage3"))
        return [
            "experiment=tiny",
            f"model.lm.name_or_path={self.root / 'base'}",
            f"model.init_from.projector={self.root / 'stage1' / 'mm_projector.bin'}",
            f"model.init_from.adapters=[{adapters}]",
            "model.projector.kind=linear",
            "model.projector.temporal_embedding=none",
            "model.projector.frames_per_token=1",
            "model.projector.query_conditioned=false",
            "model.saliency.weight=0",
            "model.aux.head=linear",
            f"data.source.feature_dim={FEATURES}",
            f"data.source.num_frames={FRAMES}",
            f"output_dir={self.root / 'run'}",
            *extra,
        ]


def random_lora(model: nn.Module) -> PeftModel:
    """LoRA on every linear layer with a non-zero B, as after training."""
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=LAYERS, task_type="CAUSAL_LM")
    )
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.05)
    return peft_model.eval()


def write_release(root: Path, base: PreTrainedTokenizerBase) -> Release:
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
    lm = LlamaForCausalLM(config)
    lm.save_pretrained(root / "base")
    base.save_pretrained(root / "base")

    tokenizer = copy.deepcopy(base)
    tokenizer.add_tokens(list(RELEASED_TOKENS), special_tokens=True)
    released = copy.deepcopy(lm)
    released.resize_token_embeddings(len(tokenizer))

    # stage 1: the projector
    projector = nn.Linear(FEATURES, HIDDEN)
    (root / "stage1").mkdir()
    torch.save(
        {"model.mm_projector.weight": projector.weight.data, "model.mm_projector.bias": projector.bias.data},
        root / "stage1" / "mm_projector.bin",
    )
    # stage 2: LoRA (safetensors) and a non-LoRA LM weight; merged before stage 3
    with torch.no_grad():
        released.model.norm.weight.mul_(1.5)
    stage2 = random_lora(released)
    stage2.save_pretrained(root / "stage2")
    torch.save(
        {"base_model.model.model.norm.weight": released.model.norm.weight.data},
        root / "stage2" / "non_lora_trainables.bin",
    )
    released = stage2.merge_and_unload()
    # stage 3: new token rows, the aux head, LoRA (.bin); the released model keeps this adapter unmerged
    base_rows = len(base)
    with torch.no_grad():
        for matrix in (released.model.embed_tokens.weight, released.lm_head.weight):
            matrix[base_rows:] = torch.randn(len(RELEASED_TOKENS), HIDDEN)
    segment_head = nn.Linear(HIDDEN, 2)
    (root / "stage3").mkdir()
    torch.save(
        {
            "base_model.model.segment_head.weight": segment_head.weight.data,
            "base_model.model.segment_head.bias": segment_head.bias.data,
            "base_model.model.model.embed_tokens.weight": released.model.embed_tokens.weight.data.clone(),
            "base_model.model.lm_head.weight": released.lm_head.weight.data.clone(),
        },
        root / "stage3" / "non_lora_trainables.bin",
    )
    stage3 = random_lora(released)
    stage3.save_pretrained(root / "stage3", safe_serialization=False)

    text = [tokenizer.bos_token_id, *tokenizer.encode("a person opens the door", add_special_tokens=False)]
    answer = [
        tokenizer.convert_tokens_to_ids(t) for t in (SEG_START, "1", "2", OFFSET, "+", "3", RETHINK, SEG_END)
    ]
    input_ids = torch.tensor([[*text, *[0] * FRAMES, *answer]])
    frames = torch.zeros(input_ids.shape[1], dtype=torch.bool)
    frames[len(text) : len(text) + FRAMES] = True
    features = torch.randn(FRAMES, FEATURES)
    with torch.no_grad():
        embeds = stage3.get_input_embeddings()(input_ids)
        embeds[0, frames] = projector(features)
        out = stage3(inputs_embeds=embeds, output_hidden_states=True)
        offset = input_ids[0].tolist().index(tokenizer.convert_tokens_to_ids(OFFSET))
        segment = torch.sigmoid(segment_head(out.hidden_states[-1][0, offset]))
    return Release(root, tokenizer, input_ids, frames, features, out.logits[0], segment)


@pytest.fixture(scope="module", params=[None, "llama2_spm"], ids=["local", "vicuna-vocabulary"])
def release(request, tmp_path_factory) -> Release:
    if request.param is None:
        base = train_local_tokenizer(helpers.corpus(), 300)
    elif (TOKENIZERS / request.param).is_dir():
        base = AutoTokenizer.from_pretrained(TOKENIZERS / request.param)
    else:
        pytest.skip(f"real tokenizer {TOKENIZERS / request.param} absent")
    release = write_release(tmp_path_factory.mktemp("release"), base)
    if request.param == "llama2_spm":  # Vicuna's layout: the four tokens right after its 32,000
        assert release.tokenizer.convert_tokens_to_ids(list(RELEASED_TOKENS)) == [32000, 32001, 32002, 32003]
    return release


def build(overrides: list[str]) -> GroundingModule:
    cfg = load_config(overrides)
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    return build_module(cfg, datamodule)


def ours_versus_released(
    module: GroundingModule, release: Release
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """This model's logits and aux segment on the release's input, and the id of each released token
    here (by text)."""
    tokenizer, model = module.tokenizer, module.model.eval()
    by_text = tokenizer.convert_tokens_to_ids(
        release.tokenizer.convert_ids_to_tokens(list(range(len(release.tokenizer))))
    )
    ids = torch.tensor([by_text])[:, release.input_ids[0]]
    ids[0, release.frames] = tokenizer.convert_tokens_to_ids(VIDEO)
    with torch.no_grad():
        out = model.lm(inputs_embeds=model.embed(ids, release.features[None]), output_hidden_states=True)
        offset = ids[0].tolist().index(tokenizer.convert_tokens_to_ids(OFFSET))
        segment, _ = model.aux_head(out.hidden_states[-1][0, offset][None])
    return out.logits[0], segment[0], by_text


@pytest.mark.parametrize("lora", [False, True], ids=["evaluate", "fine-tune-with-lora"])
def test_released_layout_round_trip_gives_the_released_logits(release, lora):
    module = build(release.overrides(f"model.lora.enabled={str(lora).lower()}"))
    logits, segment, by_text = ours_versus_released(module, release)
    # The release numbers <RETHINK> before <OFFSET>, this tokenizer after: rows are matched by text.
    assert by_text[-2:] != list(range(len(release.tokenizer)))[-2:]
    assert torch.allclose(logits[:, by_text], release.logits, atol=1e-5)
    assert torch.allclose(segment, release.segment, atol=1e-6)
    projected = module.model.projector(release.features)
    stage1 = torch.load(release.root / "stage1" / "mm_projector.bin")
    assert torch.allclose(
        projected,
        release.features @ stage1["model.mm_projector.weight"].T + stage1["model.mm_projector.bias"],
    )


def test_embedding_matrices_saved_in_the_adapter_file_load_by_text_too(release, tmp_path):
    """PEFT saves resized embedding matrices into adapter_model.* itself; they load like non-LoRA ones."""
    copied = copy_release(release, tmp_path)
    non_lora = torch.load(copied.root / "stage3" / "non_lora_trainables.bin")
    matrices = {k: non_lora.pop(k) for k in list(non_lora) if "segment_head" not in k}
    torch.save(non_lora, copied.root / "stage3" / "non_lora_trainables.bin")
    rewrite(copied.root / "stage3" / "adapter_model.bin", lambda state: state.update(matrices))
    logits, _, by_text = ours_versus_released(build(copied.overrides()), copied)
    assert torch.allclose(logits[:, by_text], copied.logits, atol=1e-5)


@pytest.mark.slow
def test_train_py_fine_tunes_from_released_weights(release, tmp_path):
    overrides = [
        "model.lora.enabled=true",
        "trainer.max_steps=2",
        "model.saliency.projector_steps=0",
        "data.source.num_val=4",
        "data.source.num_test=4",
    ]
    assert train.main(release.overrides(*overrides, f"output_dir={tmp_path}")) == 0
    assert (tmp_path / "metrics.json").is_file()


def test_released_adapters_merged_without_lora_leave_the_lm_training(release):
    """Before: merging the released adapters (peft) froze the LM, so with model.lora.enabled=false it did
    not train at all, silently (found by review)."""
    trains = [
        n
        for n, p in build(release.overrides("model.lora.enabled=false")).named_parameters()
        if p.requires_grad
    ]
    fresh = [o for o in release.overrides("model.lora.enabled=false") if not o.startswith("model.init_from")]
    assert trains == [n for n, p in build(fresh).named_parameters() if p.requires_grad]
    assert any(name.startswith("model.lm.") for name in trains)


def test_without_init_from_the_logits_differ(release):
    overrides = [o for o in release.overrides() if not o.startswith("model.init_from")]
    logits, _, by_text = ours_versus_released(build(overrides), release)
    assert not torch.allclose(logits[:, by_text], release.logits, atol=1e-2)


# ---- files that do not fit: one line naming the file and the key ---------------------------------------


def copy_release(release: Release, tmp_path: Path) -> Release:
    shutil.copytree(release.root, tmp_path / "copy", ignore=shutil.ignore_patterns("run"))
    return replace(release, root=tmp_path / "copy")


def rewrite(path: Path, change) -> None:
    state = torch.load(path)
    change(state)
    torch.save(state, path)


def failure(overrides: list[str]) -> str:
    with pytest.raises(ReleasedWeightsError) as caught:
        build(overrides)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_missing_file_stops_train_py_with_one_line_and_nothing_written(release, tmp_path, capsys):
    copied = copy_release(release, tmp_path)
    (copied.root / "stage1" / "mm_projector.bin").unlink()
    assert train.main(copied.overrides()) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"error: {copied.root / 'stage1' / 'mm_projector.bin'}: no such file or folder"
    assert not (copied.root / "run").exists()


def test_a_missing_adapter_folder_is_named(release, tmp_path):
    copied = copy_release(release, tmp_path)
    shutil.rmtree(copied.root / "stage3")
    assert failure(copied.overrides()) == f"{copied.root / 'stage3'}: no such file or folder"


def test_a_missing_projector_key_is_named(release, tmp_path):
    copied = copy_release(release, tmp_path)
    file = copied.root / "stage1" / "mm_projector.bin"
    rewrite(file, lambda state: state.pop("model.mm_projector.bias"))
    assert failure(copied.overrides()) == f"{file}: missing key model.mm_projector.bias"


def test_a_projector_of_another_feature_size_is_named(release):
    message = failure(release.overrides("data.source.feature_dim=16"))
    assert message.endswith(
        f"model.mm_projector.weight has shape ({HIDDEN}, {FEATURES}), this model needs ({HIDDEN}, 16)"
    )


@pytest.mark.parametrize(
    "setting",
    [
        "model.projector.kind=mlp",
        "model.projector.frames_per_token=2",
        "model.projector.temporal_embedding=learned",
        "model.projector.query_conditioned=true",
    ],
)
def test_a_projector_that_cannot_hold_the_released_one_is_refused(release, setting):
    message = failure(release.overrides(setting))
    assert (
        "mm_projector.bin: the released projector is one Linear per frame; set model.projector.kind=linear"
        in message
    )


def test_a_missing_adapter_key_is_named(release, tmp_path):
    copied = copy_release(release, tmp_path)
    file = copied.root / "stage3" / "adapter_model.bin"
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    rewrite(file, lambda state: state.pop(key))
    assert failure(copied.overrides()) == f"{file}: missing key {key}"


def test_a_mis_shaped_adapter_key_is_named(release, tmp_path):
    copied = copy_release(release, tmp_path)
    file = copied.root / "stage3" / "adapter_model.bin"
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    rewrite(file, lambda state: state.update({key: torch.zeros(4, HIDDEN + 1)}))
    assert (
        failure(copied.overrides())
        == f"{file}: {key} has shape (4, {HIDDEN + 1}), this model needs (4, {HIDDEN})"
    )


def test_a_non_lora_key_without_a_place_is_named(release, tmp_path):
    copied = copy_release(release, tmp_path)
    file = copied.root / "stage3" / "non_lora_trainables.bin"
    rewrite(file, lambda state: state.update({"base_model.model.model.vision_tower.weight": torch.zeros(2)}))
    assert (
        failure(copied.overrides())
        == f"{file}: key base_model.model.model.vision_tower.weight has no place in this model"
    )


def test_a_folder_without_adapter_config_is_named(release, tmp_path):
    copied = copy_release(release, tmp_path)
    (copied.root / "stage2" / "adapter_config.json").unlink()
    assert failure(copied.overrides()).startswith(
        f"{copied.root / 'stage2' / 'adapter_config.json'}: no such file"
    )


def test_a_segment_head_needs_a_linear_aux_head(release):
    assert "set model.aux.head=linear" in failure(release.overrides("model.aux.head=mlp"))
    assert "this model has no aux head" in failure(release.overrides("model=direct"))
