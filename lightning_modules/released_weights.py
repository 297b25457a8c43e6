"""Weights released in the VTimeLLM / TimeRefine layout, loaded into this project's Video LLM.

The layout (facts of the official releases; none of their code is used):

- stage 1: ``mm_projector.bin``, a torch state dict whose keys contain ``mm_projector.``: the
  ``weight`` and ``bias`` of a ``Linear(feature_dim, hidden)`` applied to each frame;
- stages 2 and 3: PEFT LoRA folders (``adapter_config.json``, ``adapter_model.safetensors`` or
  ``.bin``) and, optionally, ``non_lora_trainables.bin``, whose keys start with ``base_model.model.``:
  the aux head ``segment_head`` (``Linear(hidden, 2)`` then a sigmoid), projector keys, or any LM
  weight by its Hugging Face name (whole embedding and output matrices included). The official LoRA
  config lists ``segment_head`` in ``modules_to_save``, so PEFT wraps the head: a Trainer checkpoint
  (``checkpoint-N``, what the official evaluation loads) holds it in ``adapter_model.*`` as
  ``segment_head.weight`` (with the resized embedding matrices), the final save in
  ``non_lora_trainables.bin`` as ``segment_head.modules_to_save.default.*``. Keys of the wrapper's
  ``original_module`` (PEFT's frozen copy of the head before training, unused once trained) are
  left out; every other key has a place or is an error;
- the release added its tokens after the base vocabulary, in ``InitFromSpec.added_tokens``' order,
  so the rows of its embedding matrices are matched to this model's tokens by text, not by number.

Stage 2 is merged into the LM before stage 3 is loaded and merged. A missing file, a missing or
mis-shaped key, or a key with no place in the model raises ``ReleasedWeightsError``: one line naming
the file and the key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from grounding.answer_format.tokens import REFERENCE_MARKERS
from grounding.checks import Checked, a_name, checked, items, optional
from lightning_modules.aux_head import AuxHead
from lightning_modules.projector import FrameProjector
from lightning_modules.video_llm import VideoLLM

RELEASED_TOKENS = REFERENCE_MARKERS  # the official add_tokens order
PEFT_PREFIX = "base_model.model."
NON_LORA = "non_lora_trainables.bin"
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", ("adapter_model.safetensors", "adapter_model.bin")
PROJECTOR_KEY, SEGMENT_HEAD, LORA_KEY = "mm_projector.", "segment_head.", "lora_"
MODULES_TO_SAVE, ORIGINAL_MODULE = ".modules_to_save.", ".original_module."  # PEFT's ModulesToSaveWrapper


class ReleasedWeightsError(ValueError):
    """A released-weights file that cannot be loaded into the configured model; names file and key."""


@dataclass
class InitFromSpec(Checked):
    """Released weights to start from (docs/real_lms.md "Released weights"). ``projector``: stage 1's
    ``mm_projector.bin``; ``adapters``: the stage-2 and stage-3 LoRA folders, merged into the LM in
    this order; ``added_tokens``: the tokens the release added after its base vocabulary, in order."""

    projector: str | None = checked(None, optional(a_name))
    adapters: list[str] = checked([], items(a_name))
    added_tokens: list[str] = checked(list(RELEASED_TOKENS), items(a_name, 1))


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def read_state_dict(path: Path, keep: Callable[[str], bool] = lambda key: True) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file or a torch state dict whose keys ``keep`` accepts (read
    lazily: only those tensors are loaded)."""
    if not path.is_file():
        raise ReleasedWeightsError(f"{path}: no such file")
    try:
        if path.suffix == ".safetensors":
            with safe_open(path, framework="pt") as file:
                return {key: file.get_tensor(key) for key in file.keys() if keep(key)}  # noqa: SIM118 (not a dict)
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # any unreadable file: pickle, zip and safetensors raise different types
        raise ReleasedWeightsError(f"{path}: not a readable state dict ({_one_line(error)})") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ReleasedWeightsError(f"{path}: not a state dict of tensors")
    return {key: value for key, value in state.items() if keep(key)}


def check_keys(
    found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], file: Path, prefix: str = ""
) -> None:
    """``found`` holds exactly ``expected``'s keys (``prefix`` + key in the file), each of its shape."""
    for key, tensor in expected.items():
        if key not in found:
            raise ReleasedWeightsError(f"{file}: missing key {prefix}{key}")
        if found[key].shape != tensor.shape:
            raise ReleasedWeightsError(
                f"{file}: {prefix}{key} has shape {tuple(found[key].shape)}, this model needs {tuple(tensor.shape)}"
            )
    extra = sorted(set(found) - set(expected))
    if extra:
        raise ReleasedWeightsError(f"{file}: key {prefix}{extra[0]} has no place in this model")


def without_prefix(state: dict[str, torch.Tensor], file: Path) -> dict[str, torch.Tensor]:
    """A PEFT-saved state dict's keys without ``base_model.model.`` and PEFT's modules-to-save
    wrapping (``X.modules_to_save.<adapter>.Y`` is ``X.Y``; ``X.original_module.*`` is left out); a
    key without the prefix is an error."""
    kept = {}
    for key, value in state.items():
        if not key.startswith(PEFT_PREFIX):
            raise ReleasedWeightsError(f"{file}: key {key} does not start with {PEFT_PREFIX}")
        if ORIGINAL_MODULE in key:
            continue
        if MODULES_TO_SAVE in key:
            wrapped, rest = key.split(MODULES_TO_SAVE, 1)
            key = f"{wrapped}.{rest.split('.', 1)[-1]}"
        kept[key.removeprefix(PEFT_PREFIX)] = value
    return kept


def non_lora_trainables(folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """``non_lora_trainables.bin`` of a stage folder, its keys as :func:`without_prefix` gives them ({} if absent)."""
    file = folder / NON_LORA
    return file, without_prefix(read_state_dict(file), file) if file.is_file() else {}


def adapter_weights(folder: Path) -> Path:
    """The ``adapter_model.*`` file of a LoRA folder."""
    weights_file = next((folder / n for n in ADAPTER_WEIGHTS if (folder / n).is_file()), None)
    if weights_file is None:
        raise ReleasedWeightsError(f"{folder}: no {' or '.join(ADAPTER_WEIGHTS)}")
    return weights_file


def is_head_key(key: str) -> bool:
    """A key of the projector or the aux head, outside the LM."""
    return PROJECTOR_KEY in key or key.startswith(SEGMENT_HEAD)


# ---- the LM: weights of non_lora_trainables, then each stage's LoRA merged --------------------------


def merge_released(
    lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, spec: InitFromSpec
) -> PreTrainedModel:
    """``lm`` (without adapters of its own) with each stage's LM weights loaded and its LoRA merged.
    Every named file and folder is checked first: a wrong path fails before the slow merges."""
    for path in [*([spec.projector] if spec.projector else []), *spec.adapters]:
        if not Path(path).exists():
            raise ReleasedWeightsError(f"{path}: no such file or folder")
    for folder in map(Path, spec.adapters):
        file, state = non_lora_trainables(folder)
        load_lm_weights(lm, {k: v for k, v in state.items() if not is_head_key(k)}, tokenizer, spec, file)
        lm = merge_lora(lm, folder, tokenizer, spec)
    return lm


def released_rows(
    tokenizer: PreTrainedTokenizerBase, added_tokens: list[str], rows: int, file: Path, key: str
) -> tuple[list[int], list[int]]:
    """(rows of the file's matrix, rows of this model's) of the same tokens: the base vocabulary by
    id, the release's added tokens by text."""
    base = rows - len(added_tokens)
    ids = tokenizer.convert_tokens_to_ids(list(added_tokens))
    for token, token_id in zip(added_tokens, ids, strict=True):
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ReleasedWeightsError(f"{file}: {key} has a row for {token}, which this tokenizer lacks")
        if token_id < base:
            raise ReleasedWeightsError(
                f"{file}: {key} has {rows} rows ({base} base tokens, then {len(added_tokens)} added), but this "
                f"tokenizer has {token} at id {token_id}: not the release's base vocabulary"
            )
    return [*range(rows)], [*range(base), *ids]


def load_lm_weights(
    lm: PreTrainedModel,
    state: dict[str, torch.Tensor],
    tokenizer: PreTrainedTokenizerBase,
    spec: InitFromSpec,
    file: Path,
) -> None:
    """Copy LM weights by name; the embedding and output matrices row by row, matched by token text."""
    params = dict(lm.named_parameters(remove_duplicate=False))
    matrices = {
        f"{name}.weight"
        for name, module in lm.named_modules()
        if module is lm.get_input_embeddings() or module is lm.get_output_embeddings()
    }
    with torch.no_grad():
        for key, value in state.items():
            if key not in params:
                raise ReleasedWeightsError(f"{file}: key {PEFT_PREFIX}{key} has no place in this model")
            param = params[key]
            if key in matrices and value.ndim == 2 and value.shape[1] == param.shape[1]:
                source, target = released_rows(
                    tokenizer, spec.added_tokens, value.shape[0], file, PEFT_PREFIX + key
                )
                param[target] = value[source].to(param.dtype)
            elif value.shape == param.shape:
                param.copy_(value)
            else:
                raise ReleasedWeightsError(
                    f"{file}: {PEFT_PREFIX}{key} has shape {tuple(value.shape)}, this model needs {tuple(param.shape)}"
                )


def merge_lora(
    lm: PreTrainedModel, folder: Path, tokenizer: PreTrainedTokenizerBase, spec: InitFromSpec
) -> PreTrainedModel:
    """``lm`` with the LoRA adapter of ``folder`` loaded (every key present, of its shape) and merged.
    Other weights in the adapter file load as LM weights (PEFT saves resized embedding matrices
    there), except those of the aux head and the projector (``load_released_heads``)."""
    config_file = folder / ADAPTER_CONFIG
    if not config_file.is_file():
        raise ReleasedWeightsError(
            f"{config_file}: no such file (a LoRA folder holds it and adapter_model.*)"
        )
    weights_file = adapter_weights(folder)
    weights = read_state_dict(weights_file)
    others = without_prefix(
        {key: value for key, value in weights.items() if LORA_KEY not in key}, weights_file
    )
    load_lm_weights(
        lm, {k: v for k, v in others.items() if not is_head_key(k)}, tokenizer, spec, weights_file
    )
    try:
        config = PeftConfig.from_pretrained(str(folder))
        if not isinstance(config, LoraConfig):
            raise ValueError(f"peft_type {config.peft_type} is not LORA")
        model = get_peft_model(lm, config)
    except (ValueError, TypeError, KeyError) as error:
        raise ReleasedWeightsError(f"{config_file}: {_one_line(error)}") from error
    lora = {key: value for key, value in weights.items() if LORA_KEY in key}
    check_keys(lora, get_peft_model_state_dict(model, save_embedding_layers=False), weights_file)
    set_peft_model_state_dict(model, lora)
    return model.merge_and_unload()


# ---- outside the LM: projector and aux head --------------------------------------------------------


def load_released_heads(model: VideoLLM, spec: InitFromSpec) -> None:
    """Stage 1's projector, then the projector and aux head weights of each stage, from its adapter
    file (a Trainer checkpoint's modules to save) and its non_lora_trainables (the final save)."""
    if spec.projector:
        file = Path(spec.projector)
        load_projector(model, read_state_dict(file), file, "")
    for folder in map(Path, spec.adapters):
        file = adapter_weights(folder)
        sources = [(file, without_prefix(read_state_dict(file, lambda k: LORA_KEY not in k), file))]
        sources.append(non_lora_trainables(folder))
        for file, state in sources:
            if any(PROJECTOR_KEY in key for key in state):
                load_projector(model, state, file, PEFT_PREFIX)
            head = {k.removeprefix(SEGMENT_HEAD): v for k, v in state.items() if k.startswith(SEGMENT_HEAD)}
            if head:
                load_segment_head(model.aux_head, head, file, PEFT_PREFIX + SEGMENT_HEAD)


def load_projector(model: VideoLLM, state: dict[str, torch.Tensor], file: Path, prefix: str) -> None:
    """The ``mm_projector.`` keys into the projector's one Linear; any other projector is refused."""
    keys = [key for key in state if PROJECTOR_KEY in key]
    if not keys:
        raise ReleasedWeightsError(f"{file}: no key contains {PROJECTOR_KEY!r} (stage 1 projector weights)")
    projector = model.projector
    plain = (
        isinstance(projector, FrameProjector)
        and isinstance(projector.net, nn.Linear)
        and projector.frames_per_token == 1
        and projector.time is None
        and projector.film is None
        and model.frame_index_ids is None
    )
    if not plain:
        raise ReleasedWeightsError(
            f"{file}: the released projector is one Linear per frame; set model.projector.kind=linear "
            "model.projector.temporal_embedding=none model.projector.frames_per_token=1 "
            "model.projector.query_conditioned=false"
        )
    start = keys[0][: keys[0].index(PROJECTOR_KEY) + len(PROJECTOR_KEY)]
    found = {key.removeprefix(start): state[key] for key in keys}
    check_keys(found, projector.net.state_dict(), file, prefix + start)
    projector.net.load_state_dict(found)


def load_segment_head(
    head: nn.Module | None, state: dict[str, torch.Tensor], file: Path, prefix: str
) -> None:
    """``segment_head`` (Linear(hidden, 2) + sigmoid) into a linear aux head, whose output is the same."""
    if head is None:
        raise ReleasedWeightsError(
            f"{file}: holds {prefix}* but this model has no aux head (model.aux.weight=0 or model.refine.steps=0)"
        )
    if not (isinstance(head, AuxHead) and isinstance(head.net, nn.Linear) and head.loss_name != "distance"):
        raise ReleasedWeightsError(
            f"{file}: {prefix}* is a Linear(hidden, 2) + sigmoid; set model.aux.head=linear and a "
            "model.aux.loss other than distance"
        )
    check_keys(state, head.net.state_dict(), file, prefix)
    head.net.load_state_dict(state)
