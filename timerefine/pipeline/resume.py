"""Which checkpoint a run continues from, checked to be readable before the run writes anything."""

from __future__ import annotations

import zipfile
from pathlib import Path

from lightning.pytorch.plugins.environments import SLURMEnvironment

from callbacks.slurm_requeue import hpc_checkpoints


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


def checked(path: Path, own: bool = True) -> str:
    """``path`` when it reads as a checkpoint; else CheckpointError, advising to delete it only when
    it is the run's ``own`` resume point (not a file the user named)."""
    problem = unreadable(path)
    if problem is not None:
        advice = "delete it to start the run over, or pass" if own else "pass"
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({problem}); {advice} resume=<another checkpoint>"
        )
    return str(path)


def resume_checkpoint(resume: str | None, output_dir: Path) -> str | None:
    """``auto``: a SLURM HPC checkpoint (Lightning finds it: "hpc"), else ``checkpoints/last.ckpt``
    when present, else nothing. Any other value is a checkpoint path that must exist. The checkpoint
    must be readable: a truncated or corrupt one is a :class:`CheckpointError` naming it."""
    if resume is None:
        return None
    if resume != "auto":
        if not Path(resume).is_file():
            raise FileNotFoundError(f"resume={resume}: no such checkpoint file")
        return checked(Path(resume), own=False)
    hpc = hpc_checkpoints(output_dir)
    if hpc and SLURMEnvironment.detect():  # detect() warns wherever srun is installed: only when needed
        checked(hpc[max(hpc)])
        return "hpc"
    last = output_dir / "checkpoints" / "last.ckpt"
    return checked(last) if last.is_file() else None


def checkpoint_file(checkpoint: str, output_dir: Path) -> Path:
    """The file a :func:`resume_checkpoint` result names (``hpc``: the newest SLURM HPC checkpoint)."""
    if checkpoint == "hpc":
        hpc = hpc_checkpoints(output_dir)
        return hpc[max(hpc)]
    return Path(checkpoint)
