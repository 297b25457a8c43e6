"""Evaluate a trained run's checkpoint without training.

The command-line entry point; the code is in timerefine/evaluate.py (also installed as ``timerefine-evaluate``).
"""

import sys

from timerefine.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
