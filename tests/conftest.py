"""Shared pytest fixtures."""

from tests.slurm_cluster import slurm_cluster  # noqa: F401  (session fixture: local SLURM cluster)
