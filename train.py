"""Train a Video LLM for temporal grounding, test its best checkpoint, write the run's outputs.

The command-line entry point; the code is in timerefine/train.py (also installed as ``timerefine-train``).
"""

import sys

from callbacks.slurm_signal import requeue_outside_training

requeue_outside_training()  # before the heavy imports: SLURM's signal may come while they load
from timerefine.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
