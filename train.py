"""Train a Video LLM for temporal grounding, test its best checkpoint, write the run's outputs.

The command-line entry point; the code is in timerefine/train.py (also installed as ``timerefine-train``).
"""

import sys

from timerefine.train import main

if __name__ == "__main__":
    sys.exit(main())
