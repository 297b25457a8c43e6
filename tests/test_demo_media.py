"""The demo's pictures and clips count time as the grounding does: from the stream's first timestamp."""

from __future__ import annotations

from types import SimpleNamespace

import av
import numpy as np
import pytest

from tests.inference_runs import write_moment_video
from timerefine.demo.media import cut_clip, decoded_from, frames_at
from timerefine.inference.frame_encoder import sample_frames


def red(image: np.ndarray) -> bool:
    return bool(image[..., 0].mean() > image[..., 2].mean() + 3)


def test_a_stream_that_starts_at_2_s_shows_the_moment_the_grounding_saw(tmp_path):
    """Review: frames_at and cut_clip sought absolute timestamps, so on a video whose stream starts at
    2 s (a copy cut without re-encoding) the pictures and the clip of an answer were 2 s off."""
    video = write_moment_video(tmp_path / "cut.mp4", 4.0, "red", 1.0, 2.0, fps=10, first_frame_at=2.0)
    assert sample_frames(video, 40).times[0] == 0  # the grounding's clock starts with the stream
    assert [red(image) for image in frames_at(video, [0.5, 1.5, 2.5])] == [False, True, False]
    with av.open(str(cut_clip(video, 1.0, 2.0, tmp_path / "clip.webm"))) as clip:
        shown = [red(frame.to_ndarray(format="rgb24")) for frame in clip.decode(video=0)]
    assert len(shown) >= 9 and sum(shown) >= 9


def test_a_seek_that_lands_past_a_keyframe_shows_pictures_not_grey(tmp_path):
    """Review: in an MPEG-TS file the seek lands on a frame that is not a keyframe, which decodes grey."""
    video = write_moment_video(tmp_path / "moment.ts", 4.0, "red", 1.0, 2.0, fps=10)
    assert [red(image) for image in frames_at(video, [0.5, 1.5, 2.5])] == [False, True, False]
    with av.open(str(cut_clip(video, 1.0, 2.0, tmp_path / "clip.webm"))) as clip:
        shown = [red(frame.to_ndarray(format="rgb24")) for frame in clip.decode(video=0)]
    assert len(shown) >= 9 and sum(shown) >= 9


class NoKeyframes:
    """A container whose frames are none of them keyframes, as in a stream of intra refresh."""

    def __init__(self, container) -> None:
        self.container = container

    def seek(self, *args, **kwargs) -> None:
        self.container.seek(*args, **kwargs)

    def decode(self, stream):
        return (SimpleNamespace(key_frame=False, time=f.time) for f in self.container.decode(stream))


def test_a_stream_without_keyframes_gives_every_frame_from_its_start(tmp_path):
    video = write_moment_video(tmp_path / "moment.mp4", 2.0, "red", 1.0, 2.0, fps=10)
    with av.open(str(video)) as container:
        times = [t for t, _ in decoded_from(NoKeyframes(container), container.streams.video[0], 1.5)]
    assert times == pytest.approx([i / 10 for i in range(20)])
