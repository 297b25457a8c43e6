"""What runs in the packing processes of ``timerefine-pack-features``: litdata's ``optimize`` in a child
process, and the function its workers pack each video with. Light to import (no torch models), as every
one of those processes imports it."""

from __future__ import annotations

import multiprocessing
import signal
import sys
from typing import Any

from datamodules.feature_stores import FolderFeatureStore


def pack_item(video_id: str, src: str, num_frames: int, feature_dim: int, dtype: str) -> dict:
    """One packed sample: the video id and its resampled features (litdata ``optimize`` function)."""
    features = FolderFeatureStore(src, num_frames, feature_dim).load(video_id)
    return {"video_id": video_id, "features": features.astype(dtype)}


def optimize_in_child(**arguments: Any) -> None:
    """litdata's ``optimize(**arguments)``, run in a child process: its SIGINT handler ends the process
    with ``os._exit(0)`` (and it forces the "spawn" start method process-wide), so Ctrl-C there leaves
    this process to say that the packing stopped, and to stop the child, which stops its workers."""
    packing = multiprocessing.get_context("spawn").Process(target=optimize_here, kwargs=arguments)
    packing.start()
    try:
        packing.join()
    except BaseException:  # Ctrl-C, or the caller's SIGTERM handler's exception
        packing.terminate()
        packing.join(timeout=30)
        if packing.is_alive():  # stuck in its exit (a full queue, say)
            packing.kill()
            packing.join()
        raise
    if packing.exitcode != 0:
        failed = f"failed (exit code {packing.exitcode}; its error is above)"
        raise RuntimeError(f"packing into {arguments['output_dir']} {failed}")


def optimize_here(**arguments: Any) -> None:
    """The packing child's work: its workers stop with it on SIGTERM (by default they ran on, orphaned)."""
    from litdata import optimize

    signal.signal(signal.SIGTERM, stop_workers)
    optimize(**arguments)


def stop_workers(signum: int, frame: object) -> None:
    """SIGTERM's handler in the packing child: its workers stop too, and then the child."""
    for child in multiprocessing.active_children():
        child.terminate()
    sys.exit(128 + signum)
