"""Shared pytest fixtures."""

import os
from pathlib import Path

import pytest

from tests.inference_runs import builtin_run, video_run  # noqa: F401  (session fixtures: tiny trained runs)
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (session fixture: local SLURM cluster)


@pytest.fixture
def unwritable_folder(tmp_path) -> Path:
    """A folder in which making anything raises PermissionError: a read-only one, or for root (whom
    modes do not stop) sysfs; skipped where neither refuses so (a read-only mount: another OSError)."""
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o500)
    if os.geteuid() == 0:
        folder = Path("/sys/timerefine-test")
    try:
        (folder / "probe").mkdir(parents=True)
    except PermissionError:
        return folder
    except OSError:
        pass
    pytest.skip(f"{folder}: writable here, so nothing can show a refused write")
