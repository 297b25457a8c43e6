"""Pictures and clips for the demo: frames at given times, the moment as a playable clip, and, for
videos that have only features (the built-in data), an image of the features over time."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from timerefine.inference.frame_encoder import stream_start

THUMBNAIL_HEIGHT = 160


def _even(value: float) -> int:
    return max(2, int(value) // 2 * 2)


def decoded_from(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, seconds: float
) -> Iterator[tuple[float | None, av.VideoFrame]]:
    """``(seconds from the stream's start, frame)`` from a keyframe at or before ``seconds`` on. A seek
    can land past a keyframe (MPEG-TS): what decodes before the next one is no picture (grey), so those
    frames are dropped, and a first keyframe after ``seconds`` has the seek go further back. A stream
    without keyframes (intra refresh) gives every frame from its start."""
    offset, back = stream_start(stream), 0.0

    def shown(frame: av.VideoFrame) -> float | None:
        return None if frame.time is None else frame.time - offset

    while True:
        earliest = max(seconds - back, 0.0)
        container.seek(int((earliest + offset) / stream.time_base), stream=stream, backward=True)
        frames = container.decode(stream)
        key = next((frame for frame in frames if frame.key_frame), None)  # what comes before: dropped
        if key is None and earliest == 0.0:
            container.seek(int(offset / stream.time_base), stream=stream, backward=True)
            yield from ((shown(frame), frame) for frame in container.decode(stream))
            return
        if key is not None and (key.time is None or shown(key) <= seconds + 1e-6 or earliest == 0.0):
            yield shown(key), key
            yield from ((shown(frame), frame) for frame in frames)
            return
        back = max(2 * back, 1.0)


def frames_at(video: Path, times: list[float]) -> list[np.ndarray]:
    """RGB frames ``(H, W, 3)`` shown at each of ``times`` (seconds from the stream's start, as the
    grounding counts them), scaled to the thumbnail height."""
    found: list[np.ndarray] = []
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        scale = THUMBNAIL_HEIGHT / stream.codec_context.height
        size = {"width": _even(stream.codec_context.width * scale), "height": THUMBNAIL_HEIGHT}
        for time in times:
            frame = None
            for shown, decoded in decoded_from(container, stream, time):  # to the first shown at ``time``
                frame = decoded
                if shown is not None and shown + 1e-6 >= time:
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

        def add(frame: av.VideoFrame) -> None:
            image = frame.reformat(width=encoder.width, height=encoder.height, format="yuv420p")
            image.pts = None
            for packet in encoder.encode(image):
                target.mux(packet)

        written, before = 0, None
        for shown, frame in decoded_from(source, stream, start):
            if shown is None or shown + 1e-6 < start:
                before = frame
                continue
            if written and shown > end:
                break
            add(frame)
            written += 1
            if shown > end:  # the one frame of a segment shorter than a frame interval
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
