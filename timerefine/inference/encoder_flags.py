"""The command-line flags that choose the video encoder of a run (``--encoder``, ``--no-projection``,
``--fp16``), shared by timerefine-predict and the demo."""

from __future__ import annotations

import argparse
from dataclasses import replace

from timerefine.inference.grounder import Grounder
from timerefine.inference.video_features import EncoderSpec, InputError


def add_encoder_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--encoder", help="CLIP vision model (hub name or path) instead of the recorded one")
    parser.add_argument("--no-projection", action="store_true", help="with --encoder: pooled output")
    parser.add_argument(
        "--fp16", action="store_true", help="encode in float16 (--encoder or the recorded one)"
    )


def encoder_of_flags(args: argparse.Namespace, grounder: Grounder) -> EncoderSpec | None:
    """``--encoder`` and its options, sampling the frames the run's own encoder sampled; else the run's
    recorded encoder in float16 with ``--fp16``; None to keep the run's. ``--no-projection`` without
    ``--encoder`` would change the recorded encoder's feature size: InputError unless it is its own."""
    recorded = grounder.encoder_spec
    if args.encoder is not None:
        frames = recorded.num_frames if recorded else grounder.run.num_frames
        return EncoderSpec(args.encoder, not args.no_projection, args.fp16, frames)
    if recorded is None:
        return None  # encoding a video then says the run records no encoder
    if args.no_projection and recorded.projection:
        raise InputError(
            f"--no-projection: {grounder.encoder_origin} {recorded.model} keeps its projection, as the "
            "run's features were made (its pooled output is another size); use it with --encoder"
        )
    return replace(recorded, fp16=True) if args.fp16 else None


def use_encoder_of_flags(args: argparse.Namespace, grounder: Grounder) -> None:
    """Have ``grounder`` encode videos as the flags say (nothing to do without them)."""
    if encoder := encoder_of_flags(args, grounder):
        grounder.use_encoder(encoder, "--encoder" if args.encoder else grounder.encoder_origin)
