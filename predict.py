"""python predict.py VIDEO_OR_FEATURES --run RUN_DIR --query "..." [--json]  (timerefine/tools/predict.py)"""

import sys

from timerefine.tools.predict import main

if __name__ == "__main__":
    sys.exit(main())
