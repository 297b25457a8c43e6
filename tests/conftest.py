"""Shared pytest fixtures."""

from tests.slurm_cluster import slurm_cluster  # noqa: F401  (session fixture: local SLURM cluster)
from tests.video_run import video_run  # noqa: F401  (session fixture: a tiny run trained on real videos)
