"""python demo.py RUN_DIR  (timerefine/demo/app.py): a web demo of a trained run on 127.0.0.1."""

import sys

from timerefine.demo.app import main

if __name__ == "__main__":
    sys.exit(main())
