"""Pictures and clips for the demo: frames at given times, the moment as a playable clip, and, for
videos that have only features (the built-in data), an image of the features over time."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from timerefine.inference.frame_encoder import stream_start

THUMBNAIL_HEIGHT = 160


def _even(value: float) -> int:
    return max(2, int(value) // 2 * 2)


def frames_at(video: Path, times: list[float]) -> list[np.ndarray]:
    """RGB frames ``(H, W, 3)`` shown at each of ``times`` (seconds from the stream's start, as the
    grounding counts them), scaled to the thumbnail height."""
    found: list[np.ndarray] = []
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        scale = THUMBNAIL_HEIGHT / stream.codec_context.height
        size = {"width": _even(stream.codec_context.width * scale), "height": THUMBNAIL_HEIGHT}
        offset = stream_start(stream)
        for time in times:
            container.seek(int((time + offset) / stream.time_base), stream=stream, backward=True)
            frame = None
            for frame in container.decode(stream):  # stops at the first frame shown at ``time``
                if frame.time is not None and frame.time - offset + 1e-6 >= time:
                    break
            if frame is not None:
                found.append(frame.to_ndarray(format="rgb24", **size))
    return found


def cut_clip(video: Path, start: float, end: float, out: Path) -> Path:
    """The frames of ``video`` from ``start`` to ``end`` seconds (from the stream's start) as a VP8 WebM
    (plays in any browser); a segment shorter than a frame interval, or past the last frame, gets the
    frame nearest after it (else the last one)."""
    with av.open(str(video)) as source, av.open(str(out), "w") as target:
        stream = source.streams.video[0]
        rate = stream.average_rate or 25
        encoder = target.add_stream("libvpx", rate=rate)
        encoder.width, encoder.height = _even(stream.codec_context.width), _even(stream.codec_context.height)
        encoder.pix_fmt, encoder.bit_rate = "yuv420p", 2_000_000
        offset = stream_start(stream)
        source.seek(int((start + offset) / stream.time_base), stream=stream, backward=True)

        def add(frame: av.VideoFrame) -> None:
            image = frame.reformat(width=encoder.width, height=encoder.height, format="yuv420p")
            image.pts = None
            for packet in encoder.encode(image):
                target.mux(packet)

        written, before = 0, None
        for frame in source.decode(stream):
            if frame.time is None or frame.time - offset + 1e-6 < start:
                before = frame
                continue
            if written and frame.time - offset > end:
                break
            add(frame)
            written += 1
            if frame.time - offset > end:  # the one frame of a segment shorter than a frame interval
                break
        if not written and before is not None:  # a segment past the last frame
            add(before)
        for packet in encoder.encode():
            target.mux(packet)
    return out


def feature_timeline(
    features: np.ndarray, duration: float, segment: tuple[float, float] | None
) -> np.ndarray:
    """The ``(T, D)`` features as a heatmap over time with the answer's boundaries, an RGB image."""
    figure = Figure(figsize=(7.6, 2.2), dpi=100)
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    scale = np.abs(features).max() or 1.0
    axes.imshow(
        features.T,
        aspect="auto",
        cmap="coolwarm",
        vmin=-scale,
        vmax=scale,
        extent=(0, duration, features.shape[1], 0),
    )
    if segment is not None:
        for boundary in segment:
            axes.axvline(boundary, color="black", linewidth=2)
        axes.axvspan(*segment, color="black", alpha=0.12)
    axes.set_xlabel("seconds")
    axes.set_ylabel("feature")
    axes.set_title(
        "features over time (this video has no pixels); lines: the answer's boundaries", fontsize=9
    )
    figure.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
