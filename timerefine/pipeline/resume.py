"""Which checkpoint a run continues from, checked to be a Lightning training checkpoint before the run
writes anything."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.environments import SLURMEnvironment

from callbacks.lightning_compat import load_sharded_checkpoint, sharded_checkpoint_metadata
from callbacks.slurm_requeue import hpc_checkpoints
from timerefine.pipeline.config import ConfigError

# What Lightning reads to continue a fit; weights saved alone (``torch.save(model.state_dict())``,
# ``save_weights_only``) lack them.
RESUME_KEYS = ("pytorch-lightning_version", "state_dict", "optimizer_states")


class CheckpointError(Exception):
    """A resume checkpoint that cannot be read."""


def unreadable(path: Path) -> str | None:
    """Why ``path`` is not a whole ``torch.save`` file (its zip index is read, not its tensors); None if it is."""
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("/data.pkl") for name in archive.namelist()):
                return "no torch.save data in it"
    except (zipfile.BadZipFile, OSError) as error:
        return f"truncated or corrupt: {error}"
    return None


def not_resumable(path: Path, keys: tuple[str, ...] = RESUME_KEYS) -> str | None:
    """Why the whole ``torch.save`` file ``path`` is no state to continue a fit from (it lacks one of
    ``keys``); None if it is. Its tensors are mapped, not read."""
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as error:  # a pickle that does not load
        return f"it does not load: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
    if not isinstance(state, dict):
        return f"not a Lightning checkpoint but a {type(state).__name__}"
    if missing := [key for key in keys if key not in state]:
        hint = " (weights saved alone?)" if "state_dict" in keys else ""
        return f"not a Lightning training checkpoint: no {missing[0]}{hint}"
    return None


def sharded_problem(folder: Path) -> str | None:
    """Why FSDP's checkpoint folder ``folder`` is no state to continue a fit from: its metadata file
    (all but the weights and optimizer states, which are shards beside it) is missing, damaged or not
    Lightning's; None if it is whole."""
    metadata = sharded_checkpoint_metadata(folder)
    if not metadata.is_file():
        return "a folder, but not a sharded checkpoint"
    problem = unreadable(metadata) or not_resumable(metadata, RESUME_KEYS[:1])
    return problem and f"{metadata.name}: {problem}"


def checked(path: Path, own: bool = True) -> str:
    """``path`` when it is a Lightning training checkpoint (a file, or a sharded folder); else
    CheckpointError, advising to delete it only when it is the run's ``own`` resume point (not a file
    the user named)."""
    problem = sharded_problem(path) if path.is_dir() else unreadable(path) or not_resumable(path)
    if problem is not None:
        advice = "delete it to start the run over, or pass" if own else "pass"
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({problem}); {advice} resume=<another checkpoint>"
        )
    return str(path)


def earlier_checkpoints(output_dir: Path) -> list[Path]:
    """The checkpoints a run left in ``output_dir``: ``checkpoints/*.ckpt`` and SLURM HPC ones."""
    return sorted((output_dir / "checkpoints").glob("*.ckpt")) + sorted(hpc_checkpoints(output_dir).values())


def read_checkpoint(path: Path, weights: bool = True) -> dict[str, Any]:
    """A checkpoint's dict (a file, or a sharded folder); ``weights=False`` maps the tensors lazily (a
    sharded folder: its metadata file only). A file that is not a whole checkpoint is a
    :class:`CheckpointError` naming it."""
    if path.is_dir() and not sharded_checkpoint_metadata(path).is_file():
        raise CheckpointError(f"checkpoint {path} cannot be read (a folder, but not a sharded checkpoint)")
    try:
        if path.is_dir():
            if weights:
                return load_sharded_checkpoint(path)
            path = sharded_checkpoint_metadata(path)
        return torch.load(path, map_location="cpu", weights_only=False, mmap=not weights)
    except Exception as error:  # truncated, empty, another format, a folder that is no checkpoint
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"checkpoint {path} cannot be read ({reason})") from error


def trainer_state(checkpoint: Path) -> dict[str, Any]:
    """A checkpoint's dict without reading its weights (mapped lazily)."""
    return read_checkpoint(checkpoint, weights=False)


def saved_step(checkpoint: Path) -> int:
    """The global step a readable checkpoint (a file, or a sharded folder) holds."""
    return trainer_state(checkpoint)["global_step"]


def resume_checkpoint(resume: str | None, output_dir: Path) -> str | None:
    """``auto``: the resume point of the latest step: on SLURM the newest HPC checkpoint ("hpc":
    :func:`checkpoint_file` names it) unless ``checkpoints/last.ckpt`` holds a later step (the job went
    on after its requeue), else ``last.ckpt`` when present, else nothing. ``None``: nothing, refused
    (ConfigError) while ``output_dir`` holds an earlier run's checkpoints, which the new run's would mix
    with. Any other value is a checkpoint path that must exist. The checkpoint must be readable: a
    truncated or corrupt one is a :class:`CheckpointError` naming it."""
    if resume is None:
        if earlier := earlier_checkpoints(output_dir):
            names = ", ".join(str(path.relative_to(output_dir)) for path in earlier)
            raise ConfigError(
                f"resume=null: {output_dir} holds an earlier run's checkpoints ({names}), which a later "
                "resume=auto would continue instead of this run; give a new output_dir, or delete "
                "them to start the run over"
            )
        return None
    if resume != "auto":
        if not Path(resume).exists():
            raise FileNotFoundError(f"resume={resume}: no such checkpoint file")
        return checked(Path(resume), own=False)
    hpc = hpc_checkpoints(output_dir)
    last = output_dir / "checkpoints" / "last.ckpt"  # a folder when FSDP saved it sharded
    if hpc and SLURMEnvironment.detect():  # detect() warns wherever srun is installed: only when needed
        newest = Path(checked(hpc[max(hpc)]))
        if not last.exists() or saved_step(newest) >= saved_step(Path(checked(last))):
            return "hpc"
    return checked(last) if last.exists() else None


def checkpoint_file(checkpoint: str, output_dir: Path) -> Path:
    """The file a :func:`resume_checkpoint` result names (``hpc``: the newest SLURM HPC checkpoint)."""
    if checkpoint == "hpc":
        hpc = hpc_checkpoints(output_dir)
        return hpc[max(hpc)]
    return Path(checkpoint)
