"""Shared pytest fixtures."""

from tests.inference_runs import builtin_run, video_run  # noqa: F401  (session fixtures: tiny trained runs)
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (session fixture: local SLURM cluster)
