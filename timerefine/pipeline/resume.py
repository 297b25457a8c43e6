"""Which checkpoint a run continues from."""

from __future__ import annotations

import logging
from pathlib import Path

from lightning.pytorch.plugins.environments import SLURMEnvironment

log = logging.getLogger(__name__)


def resume_checkpoint(resume: str | None, output_dir: Path) -> str | None:
    """``auto``: a SLURM HPC checkpoint (Lightning finds it: "hpc"), else ``checkpoints/last.ckpt``
    when present, else nothing. Any other value is a checkpoint path that must exist."""
    if resume is None:
        return None
    if resume != "auto":
        if not Path(resume).is_file():
            raise FileNotFoundError(f"resume={resume}: no such checkpoint file")
        return resume
    if SLURMEnvironment.detect() and any(output_dir.glob("hpc_ckpt_*.ckpt")):
        log.info("resuming from the SLURM HPC checkpoint in %s", output_dir)
        return "hpc"
    last = output_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        log.info("resuming from %s", last)
        return str(last)
    return None
