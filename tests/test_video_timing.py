"""Extraction decodes a video to its last frame and refuses one whose frames are not where the answer's
timeline puts them: one frame per video, and a frame rate that changes without a gap."""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from tests.inference_runs import truncated_copy, write_moment_video, write_timed_video, write_tiny_clip
from timerefine.inference.frame_encoder import ClipFrameEncoder
from timerefine.tools.extract_features import extract


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> ClipFrameEncoder:
    return ClipFrameEncoder(str(write_tiny_clip(tmp_path_factory.mktemp("clip") / "proj")))


def test_one_frame_per_video_is_extracted_and_a_truncated_file_still_refused(encoder, tmp_path):
    """Before (review): with --num-frames 1 decoding stopped at frame 0, so every whole video was
    'only 2% of the video decodes ... truncated or damaged'."""
    whole = write_moment_video(tmp_path / "whole.mp4", 10.0, "red", 2.0, 4.0)
    cut = truncated_copy(whole, tmp_path / "cut.mp4", keep=0.5)
    report = extract([whole, cut], encoder, tmp_path / "out", num_frames=1)
    assert report.done == ["whole"] and list(report.failed) == ["cut"]
    assert np.load(tmp_path / "out" / "whole.npy").shape == (1, encoder.dim)


def test_a_frame_rate_that_changes_without_a_gap_is_not_extracted(encoder, tmp_path):
    """Before (review): 15 fps for 2 s, then 30 fps for 2 s left no gap, so it was encoded, and the
    feature the answer puts at 1.6 s showed the frame at 2.17 s."""
    changing = [i / 15 for i in range(30)] + [2 + i / 30 for i in range(60)]
    video = write_timed_video(tmp_path / "changing.mp4", changing, fps=22.5)
    report = extract([video], encoder, tmp_path / "out", num_frames=16)
    assert not report.done and re.search(
        r": its frame rate varies \(frame 29 is at 1\.93 s, where an even rate puts it at 1\.29 s\)",
        report.failed["changing"],
    ), report.failed


def constant_rate_video(path: Path, frames: int, dropped: tuple[int, ...] = (), codec_options=None) -> Path:
    """30 fps mpeg4 (B-frames with ``codec_options={"bf": "2"}``), ``dropped`` frames left out."""
    kept = [i for i in range(frames) if i not in dropped]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=30, options=codec_options or {})
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        if dropped:  # timed in ms, so that a gap is left where a frame is missing
            stream.codec_context.time_base = Fraction(1, 1000)
        for i in kept:
            image = np.full((48, 64, 3), 4 * (i % 60), np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if dropped:
                frame.pts, frame.time_base = round(i * 1000 / 30), Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_constant_rate_videos_pass_the_timing_check(encoder, tmp_path):
    """Before, in this check's first version (review): an AVI with B-frames (times in decoding order)
    and a video with a few dropped frames were refused as 'its frame rate varies'."""
    videos = [
        constant_rate_video(tmp_path / "bframes.avi", 150, codec_options={"bf": "2"}),
        constant_rate_video(tmp_path / "dropped.mp4", 300, dropped=(40, 81, 122)),
        constant_rate_video(tmp_path / "one_dropped.mp4", 61, dropped=(30,)),
    ]
    report = extract(videos, encoder, tmp_path / "out", num_frames=100)
    assert report.done == ["bframes", "dropped", "one_dropped"], report.failed
