"""Export a trained run into a folder that loads without the Lightning checkpoint.

    timerefine-export runs/x exported/x [--ckpt best] [--merge-lora]

See timerefine/inference/export_folder.py for what the folder holds; ``Grounder.from_export`` (and
``timerefine-predict --run``, ``timerefine-demo``) load it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from datamodules.annotation_source import STORED_FEATURES
from timerefine.inference.export_folder import export_files, export_run
from timerefine.inference.run_loading import load_run
from timerefine.inference.video_features import InputError, recorded_encoder, unrecorded_encoder
from timerefine.pipeline.arguments import OneLineParser


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--ckpt", default="best", help="best | last | a checkpoint path")
    parser.add_argument("--merge-lora", action="store_true", help="fold the LoRA adapters into the base LM")
    args = parser.parse_args(argv)
    try:
        run = load_run(args.run_dir, args.ckpt)
        features = run.cfg.data.source.get("feature_path")
        encoder = recorded_encoder(features)
        out = export_run(run, args.out_dir, args.merge_lora, encoder)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if features and encoder is None and run.cfg.data.source.get("features") in STORED_FEATURES:
        print(
            f"note: {unrecorded_encoder(features)}: the export grounds feature files; for videos, give an "
            "encoder (timerefine-predict --encoder, Grounder's encoder argument)",
            file=sys.stderr,
        )
    size = sum((out / name).stat().st_size for name in export_files(out))
    print(f"exported {run.weights} -> {out} ({size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
