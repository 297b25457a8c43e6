"""Export a trained run into a folder that loads without the Lightning checkpoint (timerefine-export).

The folder holds ``config.yaml``, ``tokenizer/``, ``export.json`` and ``weights.safetensors``: the
trained parts by their state-dict names (projector, LoRA adapters, trainable token rows, aux head,
saliency head, time gates), plus the rows that resizing added to a pretrained LM's frozen embedding
matrices (``<name>.new_rows``). A base that cannot be reloaded (the randomly initialised tiny LM) is
stored whole. ``--merge-lora`` folds the adapters into the base weights and saves that LM with
``save_pretrained`` under ``lm/``. ``Grounder.from_export`` loads it and predicts exactly as the
checkpoint does. The weights' metadata records the config they were exported as: loading refuses a
``config.yaml`` edited since in what the model was trained as, as a checkpoint's recorded config does.

``export.json`` lists every file the export wrote. Exporting into an earlier export replaces those
files and leaves anything else in the folder alone; any other non-empty folder, or a file, is refused.
The export is written to a staging folder next to the target first, so a failed export changes nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from peft import PeftModel
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.nn import Module
from transformers import AutoConfig

from lightning_modules.pretrained import open_as_umask, resolve_pretrained
from lightning_modules.trainable import holds_token_rows
from timerefine.inference.run_loading import LoadedRun, build_untrained, in_run_precision, run_config
from timerefine.inference.video_features import EncoderSpec, InputError
from timerefine.pipeline.best_checkpoint import EXPORT_MANIFEST as MANIFEST
from timerefine.pipeline.best_checkpoint import nonfinite, shape_misfit
from timerefine.pipeline.run_identity import recorded_identity_error

WEIGHTS, LM_DIR, FORMAT = "weights.safetensors", "lm", "timerefine-export/1"
MANIFEST_KEYS = ("language_model", "base_vocab_size", "encoder")  # what loading an export reads
NEW_ROWS = ".new_rows"
CONFIG_METADATA = "config"  # weights.safetensors' metadata: the resolved config the export was written as


def is_export(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


def base_vocab_size(run: LoadedRun) -> int | None:
    """The vocabulary of the pretrained base LM (None for the tiny LM, which has no base)."""
    lm = run.cfg.model.lm
    return (
        AutoConfig.from_pretrained(resolve_pretrained(lm.name_or_path, lm.dtype)).vocab_size
        if lm.name_or_path
        else None
    )


def exported_tensors(run: LoadedRun, merged: bool, base_vocab: int | None) -> dict[str, torch.Tensor]:
    """The tensors a rebuilt module needs on top of what its config and base LM give it: all of them
    for a run that started from another (``init_from_run``: its frozen parts and merged adapters came
    from that run, which the export does without)."""
    state = run.module.state_dict()
    if merged:  # the whole LM goes to lm/
        return {n: t for n, t in state.items() if not n.startswith(run.language_model_prefix)}
    if base_vocab is None or run.cfg.init_from_run:
        return state
    trainable = {n for n, p in run.module.named_parameters(remove_duplicate=False) if p.requires_grad}
    tensors = {n: t for n, t in state.items() if n in trainable}
    vocab = len(run.module.tokenizer)
    for name, tensor in state.items():
        if name not in trainable and vocab > base_vocab and tensor.dim() == 2 and tensor.shape[0] == vocab:
            tensors[name + NEW_ROWS] = tensor[base_vocab:]  # rows resize_token_embeddings drew at random
    return tensors


def read_manifest(folder: Path) -> dict[str, Any]:
    """The ``export.json`` of the export in ``folder``; InputError naming it when it is no JSON object."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except ValueError as err:
        raise InputError(f"{folder / MANIFEST}: not JSON ({err})") from err
    if not isinstance(manifest, dict):
        raise InputError(f"{folder / MANIFEST}: a JSON {type(manifest).__name__}, not an export's manifest")
    return manifest


def export_files(folder: Path) -> list[str]:
    """The files (relative paths) the export in ``folder`` wrote; none known for one written before
    ``export.json`` listed them."""
    return read_manifest(folder).get("files", []) if is_export(folder) else []


def check_target(out: Path) -> None:
    """Refuse an ``out`` that is (or lies under) a file, or a non-empty folder that is not an export."""
    existing = next(path for path in (out, *out.parents) if path.exists())
    if not existing.is_dir():
        where = "" if existing == out else f"{existing} "
        raise InputError(f"{out}: {where}is a file, not a folder; give a folder")
    if out.is_dir() and not is_export(out) and any(out.iterdir()):
        raise InputError(f"{out}: exists and is not an export; give a new folder")
    export_files(out)  # an earlier export's manifest, read now: its files are replaced at the end


def write_export(run: LoadedRun, out: Path, merged: bool, encoder: EncoderSpec | None) -> None:
    """Write the export files of ``run`` into the empty folder ``out``."""
    cfg = run.cfg.copy()
    cfg.init_from_run = None  # what the export needs of that run is in its weights and tokenizer
    cfg.grpo.enabled = False  # GRPO is how it trained; it answers as any grounding module
    base_vocab = None if merged else base_vocab_size(run)
    if merged:
        run.language_model = run.language_model.merge_and_unload()
        run.language_model.save_pretrained(out / LM_DIR)
        run.module.tokenizer.save_pretrained(out / LM_DIR)  # its rows of the grounding tokens are trained
        cfg.model.lora.enabled = False
    # rebuilt with the row layers its adapters hold (a stage that froze its start's rows holds them)
    cfg.model.trainable.token_rows = not cfg.model.lora.enabled or holds_token_rows(run.language_model)
    tensors = exported_tensors(run, merged, base_vocab)
    trained_as = {CONFIG_METADATA: json.dumps(OmegaConf.to_container(cfg, resolve=True))}
    save_file(
        {n: t.detach().cpu().contiguous().clone() for n, t in tensors.items()}, out / WEIGHTS, trained_as
    )
    OmegaConf.save(cfg, out / "config.yaml")
    run.module.tokenizer.save_pretrained(out / "tokenizer")
    files = sorted(path.relative_to(out).as_posix() for path in out.rglob("*") if path.is_file())
    manifest = {
        "format": FORMAT,
        "checkpoint": str(run.weights.resolve()),
        "merged_lora": merged,
        "language_model": LM_DIR if merged else None,
        "base_vocab_size": base_vocab,
        "encoder": encoder.as_dict() if encoder else None,
        "tensors": len(tensors),
        "files": [*files, MANIFEST],
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def install(staging: Path, out: Path) -> None:
    """Move the export in ``staging`` into ``out``, removing the files an earlier export there wrote
    that the new one does not (folders they leave empty too); the manifest moves last."""
    new = export_files(staging)
    out.mkdir(exist_ok=True)
    for name in set(export_files(out)) - set(new):
        path = (out / name).resolve()
        if path.is_relative_to(out.resolve()) and path.is_file():
            path.unlink()
            for folder in path.parents:
                if folder == out.resolve() or any(folder.iterdir()):
                    break
                folder.rmdir()
    for name in sorted(new, key=lambda n: n == MANIFEST):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / name, out / name)


def export_run(
    run: LoadedRun, out: Path, merge_lora: bool = False, encoder: EncoderSpec | None = None
) -> Path:
    """Write the export folder of ``run`` to ``out`` (a new or empty folder, or an earlier export)."""
    check_target(out)
    has_lora = isinstance(run.language_model, PeftModel)
    if merge_lora and not has_lora:
        raise InputError(
            "--merge-lora: the run has no LoRA adapters (model.lora.enabled is false), nothing to merge; "
            "export without --merge-lora"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as error:
        raise InputError(f"{out}: cannot create it ({error.strerror})") from error
    try:
        write_export(run, staging, merge_lora, encoder)
        open_as_umask(staging)  # an export is for others to read too
        install(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """An export's tensors and the config recorded with them (None in an export written before)."""
    try:
        with safe_open(path, "pt") as weights:
            tensors = {name: weights.get_tensor(name) for name in weights.keys()}  # noqa: SIM118 (not iterable)
            recorded = (weights.metadata() or {}).get(CONFIG_METADATA)
        return tensors, None if recorded is None else json.loads(recorded)
    except (OSError, SafetensorError, ValueError) as err:  # missing, truncated, not safetensors
        raise InputError(f"{path}: cannot be read ({' '.join(str(err).split())})") from err


def check_tensors(
    path: Path, tensors: dict[str, torch.Tensor], module: Module, base_vocab: int | None
) -> None:
    """InputError naming ``path`` when one of its ``tensors`` has another shape than ``module`` needs,
    or is a parameter holding NaN or infinity."""
    own = module.state_dict()
    rows = {  # a vocabulary's rows past the base's
        n: own[n.removesuffix(NEW_ROWS)][base_vocab:]
        for n in tensors
        if n.endswith(NEW_ROWS) and n.removesuffix(NEW_ROWS) in own
    }
    if reason := shape_misfit(tensors, own | rows):
        raise InputError(f"{path}: {reason}")
    parameters = {n for n, _ in module.named_parameters(remove_duplicate=False)}
    if key := nonfinite(tensors, {n for n in tensors if n.removesuffix(NEW_ROWS) in parameters}):
        raise InputError(f"{path}: {key} holds NaN or infinite values (a diverged or damaged export)")


def load_export(
    folder: Path, device: str = "cpu", overrides: Sequence[str] = ()
) -> tuple[LoadedRun, EncoderSpec | None]:
    """The exported model in eval mode (``model.inference.*`` ``overrides`` applied) and the video
    encoder it records."""
    if not is_export(folder):
        raise InputError(f"{folder}: no {MANIFEST}, so not an exported model")
    manifest = read_manifest(folder)
    if manifest.get("format") != FORMAT:
        raise InputError(f"{folder / MANIFEST}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if missing := [key for key in MANIFEST_KEYS if key not in manifest]:
        raise InputError(f"{folder / MANIFEST}: lacks {', '.join(missing)}; export the run again")
    cfg = run_config(folder, overrides)
    tensors, recorded = read_weights(folder / WEIGHTS)
    if recorded is not None and (reason := recorded_identity_error(recorded, cfg)):
        raise InputError(f"{folder / 'config.yaml'}: not the config {WEIGHTS} was exported with: {reason}")
    if manifest["language_model"]:
        cfg.model.lm.name_or_path = str(folder / manifest["language_model"])
    module, collator = build_untrained(cfg, folder / "tokenizer")
    run = LoadedRun(cfg, module, collator, folder)
    check_tensors(folder / WEIGHTS, tensors, module, manifest["base_vocab_size"])
    rows = {n.removesuffix(NEW_ROWS): t for n, t in tensors.items() if n.endswith(NEW_ROWS)}
    missing, unexpected = module.load_state_dict(
        {n: t for n, t in tensors.items() if not n.endswith(NEW_ROWS)}, strict=False
    )
    frozen = {n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}
    from_base = manifest["language_model"] is not None
    lacking = [
        n for n in missing if n not in frozen and not (from_base and n.startswith(run.language_model_prefix))
    ]
    if unexpected or lacking:
        raise InputError(
            f"{folder / WEIGHTS}: does not fit the config (missing {lacking[:3]}, unexpected {unexpected[:3]})"
        )
    parameters = dict(module.named_parameters(remove_duplicate=False))
    if from_base and (
        key := nonfinite(parameters, {n for n in parameters if n.startswith(run.language_model_prefix)})
    ):
        raise InputError(
            f"{folder / manifest['language_model']}: {key} holds NaN or infinite values (a damaged export)"
        )
    with torch.no_grad():
        for name, values in rows.items():
            module.get_parameter(name)[manifest["base_vocab_size"] :] = values
    encoder = EncoderSpec.of(manifest["encoder"], folder / MANIFEST) if manifest["encoder"] else None
    run.module.to(device)
    return in_run_precision(run), encoder
