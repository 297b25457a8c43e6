"""A run's checkpoints read for use: the best one as its ModelCheckpoint recorded it (never guessed from
file names), each read whole or refused in one line (:class:`CheckpointError`), and its weights
checked to fit the model they are loaded into and to be finite."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from callbacks.last_checkpoint import relocated
from timerefine.pipeline.outputs import scored_weights
from timerefine.pipeline.resume import CheckpointError, read_checkpoint, trainer_state
from timerefine.pipeline.run_identity import checkpoint_identity_error, checkpoint_tokenizer_error

if TYPE_CHECKING:
    from lightning_modules.grounding_module import GroundingModule

log = logging.getLogger(__name__)
EXPORT_MANIFEST = "export.json"  # what timerefine-export writes in the folders it makes


def check_readable_best(best: Path, recorded_by: str) -> None:
    """CheckpointError naming ``best``, the best checkpoint that ``recorded_by`` records and a run
    tests, when it cannot be read (its tensors are mapped, not read)."""
    try:
        trainer_state(best)
    except CheckpointError as error:
        raise CheckpointError(
            f"{error}: the best checkpoint {recorded_by} records, which the run tests; put it back "
            "whole, or delete it to have the run choose its best anew (its final weights if it "
            "validates no more)"
        ) from error


def check_resumed_best(resumed: Path, state: Mapping[str, Any], checkpoint_dir: Path) -> None:
    """:func:`check_readable_best` for the best checkpoint the resume checkpoint ``resumed`` (its
    ``state``) records, found where the run's ``checkpoint_dir`` relocates it; one that is gone is
    forgotten when the run resumes (``LastCheckpoint.on_load_checkpoint``)."""
    saved = next((s for k, s in state.get("callbacks", {}).items() if k.startswith("ModelCheckpoint{")), {})
    if best := relocated(saved, os.path.realpath(checkpoint_dir)).get("best_model_path"):
        check_readable_best(Path(best), str(resumed))


def misfit(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> str | None:
    """Why the weights ``state`` do not fit a model whose state dict is ``own`` (a missing or extra
    tensor, another shape); None when they fit."""
    if missing := sorted(own.keys() - state.keys()):
        return f"it lacks {missing[0]}: not a model of this run's settings"
    if unexpected := sorted(state.keys() - own.keys()):
        return f"it holds {unexpected[0]}, which this run's model has no place for"
    return shape_misfit(state, own)


def shape_misfit(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> str | None:
    """The first tensor of ``state`` whose shape differs from its namesake's in ``own``, with both
    shapes; None when all that ``own`` has agree."""
    for key, tensor in state.items():
        if key in own and tensor.shape != own[key].shape:
            return f"{key} has shape {tuple(tensor.shape)}, this run's model needs {tuple(own[key].shape)}"
    return None


def nonfinite(state: Mapping[str, torch.Tensor], parameters: set[str]) -> str | None:
    """The first of ``parameters`` whose tensor in ``state`` holds NaN or infinity; None if none does
    (buffers such as attention masks may hold -inf by design)."""
    for key in sorted(parameters & state.keys()):
        tensor = state[key]
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return key
    return None


def fitting_checkpoint(
    module: GroundingModule,
    path: Path,
    tokenizer_from: Path | str,
    weights: bool = True,
    same_config: bool = True,
) -> dict[str, Any]:
    """The checkpoint at ``path`` (``weights=False``: its tensors mapped, not read), completed by
    ``module.on_load_checkpoint`` with the frozen base weights it left out. CheckpointError when it
    cannot be read, was trained with another config than the module's (``same_config``: named before
    the shapes that follow from it; a later stage starts from another run's config), carries another
    tokenizer than the module's (read from ``tokenizer_from``) or its weights do not fit ``module``;
    BaseWeightsError when it was trained on other base weights. A sharded folder read without weights
    is its metadata, its weights checked when loaded."""
    checkpoint = read_checkpoint(path, weights)
    if isinstance(checkpoint, dict) and (
        reason := (same_config and checkpoint_identity_error(path, checkpoint, module.hparams["config"]))
        or checkpoint_tokenizer_error(path, checkpoint, module.tokenizer, tokenizer_from)
    ):
        raise CheckpointError(reason)
    if path.is_dir() and not weights:
        return checkpoint
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no state_dict)")
    held = set(checkpoint["state_dict"])  # before the frozen base weights join them
    module.on_load_checkpoint(checkpoint)
    if reason := misfit(checkpoint["state_dict"], module.state_dict()):
        raise CheckpointError(f"{path}: {reason}")
    if key := nonfinite(checkpoint["state_dict"], held & {name for name, _ in module.named_parameters()}):
        raise CheckpointError(
            f"{path}: {key} holds NaN or infinite values (a diverged or damaged checkpoint)"
        )
    return checkpoint


class NoBestCheckpoint(FileNotFoundError):
    """A run whose checkpoints record no best one: it has not validated (or monitors nothing)."""


def recorded_best(checkpoint_dir: Path) -> Path:
    """The ``best_model_path`` in the newest checkpoint of ``checkpoint_dir``: one inside the folder the
    callback saved to is taken from ``checkpoint_dir`` (a moved run still finds it), one outside it as
    recorded (another run's best, kept by a run resumed from that run's checkpoint in a new folder). At
    equal steps a ``best-*`` checkpoint, written after validation, is newer than ``last.ckpt``, written
    at the batch's end before it; one that cannot be read is skipped with a warning. A run without a
    monitor (``callbacks.checkpoint.monitor: null``) is tested on its final weights: its newest
    checkpoint is its best. Raises FileNotFoundError (:class:`NoBestCheckpoint` when the checkpoints
    record none)."""
    states, files = {}, sorted(checkpoint_dir.glob("*.ckpt"))
    for path in files:
        try:
            states[path] = trainer_state(path)
        except CheckpointError as error:
            log.warning("skipped: %s", error)
    if not states:
        unreadable = f" ({len(files)} cannot be read)" if files else ""
        raise FileNotFoundError(f"no checkpoint in {checkpoint_dir}{unreadable}")
    newest = max(states, key=lambda path: (states[path]["global_step"], not path.name.startswith("last")))
    callbacks = states[newest].get("callbacks", {})
    state = next((s for k, s in callbacks.items() if k.startswith("ModelCheckpoint{")), None)
    if state is None or state.get("monitor", "") is None:  # no monitor: tested on its final weights
        return newest
    best = state.get("best_model_path", "")
    if not best and tested_final_weights(checkpoint_dir.parent, states[newest]["global_step"]):
        return newest  # it ended before a validation chose one, and was tested on these weights
    if not best:
        raise NoBestCheckpoint(
            f"{newest} records no best checkpoint (it has not validated yet); use the last one (--ckpt last)"
        )
    best, saved_in = Path(best), Path(state.get("dirpath") or Path(best).parent)
    path = checkpoint_dir / best.relative_to(saved_in) if best.is_relative_to(saved_in) else best
    if not path.exists():
        raise FileNotFoundError(f"{newest} records {path} as the best checkpoint, but it is gone")
    return path


def tested_final_weights(run_dir: Path, step: int) -> bool:
    """Whether ``run_dir``'s ``metrics.json`` says it was tested on its final weights, at ``step``."""
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):  # unfinished, or not readable: the caller's error says what is missing
        return False
    final = scored_weights(None, run_dir, step)  # what a run tested on its final weights records
    return isinstance(metrics, dict) and all(metrics.get(key) == value for key, value in final.items())


def checkpoint_path(run_dir: Path, ckpt: str) -> Path:
    """``best`` (as the run's ModelCheckpoint recorded it), ``last`` or a path; FileNotFoundError if none
    (an exported model's folder says what it is)."""
    if ckpt in ("best", "last") and (run_dir / EXPORT_MANIFEST).is_file():
        raise FileNotFoundError(
            f"{run_dir}: an exported model ({EXPORT_MANIFEST}), not a run, so it has no checkpoints; "
            f"use it with predict.py --run {run_dir} or Grounder.from_export"
        )
    if ckpt == "best":
        return recorded_best(run_dir / "checkpoints")
    path = run_dir / "checkpoints" / "last.ckpt" if ckpt == "last" else Path(ckpt)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return path
