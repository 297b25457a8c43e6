"""Shared pytest fixtures, and the order pytest-xdist hands out the test files in."""

import os
from collections.abc import Iterator
from pathlib import Path
from subprocess import run  # bound here: a test may replace subprocess.run while the fixture ends

import pytest
import torch

from tests.inference_runs import builtin_run, video_run  # noqa: F401  (session fixtures: tiny trained runs)
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (session fixture: local SLURM cluster)

# The files that take longest, longest first (seconds beside another worker on 2 cores of an AMD EPYC,
# session 32): pytest-xdist hands whole files to its workers in this order, the rest after them, so
# that no long file is left running alone at the end.
COSTLIEST_FIRST = (
    "test_action_trace_leaks.py",  # 420
    "test_pretrained_lm.py",  # 377
    "test_bench_scripts.py",  # 233
    "test_real_tokenizer_runs.py",  # 200
    "test_resume_runs.py",  # 138
    "test_slurm_jobs.py",  # 129
    "test_distributed.py",  # 102
    "test_stages.py",  # 89
    "test_fsdp_runs.py",  # 63 (session 47, an AVX2-only AMD EPYC, beside another worker)
    "test_ddp_signals.py",  # 87
    "test_slurm_requeue_runs.py",  # 63
)


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each worker (and the runs it starts) computes on its share of the cores: two
    workers of two threads each on 2 cores ran 2-4x slower than alone (OpenMP threads waiting on each
    other), the leak checks' runs 870 s instead of 216 s."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return COSTLIEST_FIRST.index(name) if name in COSTLIEST_FIRST else len(COSTLIEST_FIRST)

    items.sort(key=rank)  # stable: each file's tests keep their order


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


@pytest.fixture
def read_only_folder(tmp_path) -> Iterator[Path]:
    """A folder that refuses writes before any is tried: a read-only mount for root (whom modes do not
    stop), else one without write permission; skipped where root may not mount."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid():
        folder.chmod(0o500)
        yield folder
        folder.chmod(0o700)
        return
    mount = ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)]
    if run(mount, capture_output=True, check=False).returncode:
        pytest.skip("root may not mount a read-only folder here")
    yield folder
    run(["umount", str(folder)], check=True)
