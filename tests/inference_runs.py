"""Tiny trained runs for the inference tests: one on real video files, one on the built-in data.

Six small videos are written with PyAV: a grey background on which a coloured square appears between
two known times. Their features come from a tiny random CLIP vision model through the extraction tool
(which records the encoder), and a tiny run trains on them as Charades-STA-format annotations
(``data=charades_sta data.source.features=folder``). Nothing downloads weights.

``python -m tests.inference_runs runs/video_demo`` makes that run for trying predict, demo and export.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

from tests import launched
from timerefine.inference.frame_encoder import ClipFrameEncoder
from timerefine.tools.extract_features import extract

FPS, SIZE, FRAMES, DIM = 10, (64, 48), 16, 16
MILLISECOND = Fraction(1, 1000)
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
# video id, duration (s), colour, the square's appearance and disappearance (s)
VIDEOS = [
    ("vid_red_a", 4.0, "red", 1.0, 2.5),
    ("vid_red_b", 5.0, "red", 2.5, 4.5),
    ("vid_green_a", 4.0, "green", 0.5, 2.0),
    ("vid_green_b", 5.0, "green", 3.0, 4.0),
    ("vid_blue_a", 4.0, "blue", 2.0, 3.5),
    ("vid_blue_b", 5.0, "blue", 0.5, 1.5),
]
TRAIN_OVERRIDES = [
    "data=charades_sta",
    "data.source.features=folder",
    f"data.source.num_frames={FRAMES}",
    f"data.source.feature_dim={DIM}",
    "data.batch_size=4",
    "data.eval_batch_size=8",
    "model.lm.tiny.hidden_size=32",
    "model.lm.tiny.num_layers=1",
    "model.lm.tiny.num_heads=2",
    "model.lm.tiny.intermediate_size=64",
    "model.lm.tokenizer_vocab_size=300",
    "trainer.accelerator=cpu",
    "trainer.max_steps=6",
    "model.saliency.projector_steps=0",
    "trainer.val_check_interval=3",
    "trainer.log_every_n_steps=1",
    "callbacks.progress_bar=none",
    "logger.csv=false",
    "logger.tensorboard=false",
]


def write_moment_video(
    path: Path,
    duration: float,
    colour: str,
    appear: float,
    disappear: float,
    fps: int = FPS,
    faststart: bool = False,
    first_frame_at: float = 0.0,
) -> Path:
    """An mpeg4 video, grey but for a ``colour`` square shown from ``appear`` to ``disappear`` seconds;
    ``faststart``: an MP4's index before its frames (as web videos are), so a truncated copy opens;
    ``first_frame_at``: the stream's first timestamp (a copy cut without re-encoding), from which the
    times count."""
    width, height = SIZE
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(round(duration * fps)):
            image = np.full((height, width, 3), 120, np.uint8)
            if appear <= i / fps < disappear:
                image[12:36, 20:44] = COLOURS[colour]
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = round(first_frame_at * fps) + i, Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def truncated_copy(video: Path, out: Path, keep: float) -> Path:
    """The first ``keep`` share of a file's bytes, as an interrupted download leaves it."""
    data = video.read_bytes()
    out.write_bytes(data[: int(len(data) * keep)])
    return out


def damaged_copy(video: Path, out: Path) -> Path:
    """A copy whose bytes from a third of the file on, a quarter of it, are zeros (a damaged disk or
    transfer): frames in the middle are lost, those before and after decode."""
    data = bytearray(video.read_bytes())
    start, length = len(data) // 3, len(data) // 4
    data[start : start + length] = bytes(length)
    out.write_bytes(bytes(data))
    return out


def write_timed_video(path: Path, times: list[float], fps: float = FPS) -> Path:
    """A grey mpeg4 video whose frames are shown at ``times`` (seconds; millisecond timestamps), its
    header saying ``fps``: a variable frame rate, or frames missing, where the times say so."""
    width, height = SIZE
    image = av.VideoFrame.from_ndarray(np.full((height, width, 3), 120, np.uint8), format="rgb24")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = MILLISECOND
        for t in times:
            image.pts, image.time_base = round(t * 1000), MILLISECOND
            for packet in stream.encode(image):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_audio_only(path: Path) -> Path:
    """A file with a sound track and no video stream."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 8000), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    return path


def write_still(path: Path) -> Path:
    """A 64 x 48 PNG image at ``path``, whatever its suffix (PyAV reads it as a one-frame video)."""
    png = path.with_name(f"{path.name}.png")
    with av.open(str(png), "w", format="image2") as container:
        stream = container.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = 64, 48, "rgb24"
        frame = av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    return png.rename(path)


def write_tiny_clip(folder: Path, projection: bool = True) -> Path:
    """A randomly initialised CLIP vision model with a 16-d projection (or none: a 32-d pooled output),
    saved like a hub model."""
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=DIM,
    )
    torch.manual_seed(0)
    (CLIPVisionModelWithProjection if projection else CLIPVisionModel)(config).save_pretrained(folder)
    return folder


def write_annotations(folder: Path) -> Path:
    """Charades-STA-format files: every video in both splits, one query about its square."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"{vid} {start} {end}##a {colour} square appears\n" for vid, _, colour, start, end in VIDEOS]
    csv = "id,length\n" + "".join(f"{vid},{duration}\n" for vid, duration, *_ in VIDEOS)
    for split in ("train", "test"):
        (folder / f"charades_sta_{split}.txt").write_text("".join(lines))
        (folder / f"Charades_v1_{split}.csv").write_text(csv)
    return folder


@dataclass(frozen=True)
class VideoRun:
    run_dir: Path
    videos: Path  # folder of the .mp4 files
    features: Path  # their extracted features (with encoder.json)
    encoder: Path  # the tiny CLIP model


def train_video_run(root: Path, *overrides: str) -> VideoRun:
    videos = root / "videos"
    videos.mkdir(parents=True)
    for vid, duration, colour, start, end in VIDEOS:
        write_moment_video(videos / f"{vid}.mp4", duration, colour, start, end)
    encoder = write_tiny_clip(root / "tiny_clip")
    features = root / "features"
    report = extract(sorted(videos.iterdir()), ClipFrameEncoder(str(encoder)), features, num_frames=FRAMES)
    assert not report.failed, report.failed
    run_dir = root / "run"
    args = [
        *TRAIN_OVERRIDES,
        f"data.source.root={write_annotations(root / 'annotations')}",
        f"data.source.feature_path={features}",
        f"output_dir={run_dir}",
        *overrides,
    ]
    result = launched.run(["train.py", *args], timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return VideoRun(run_dir, videos, features, encoder)


@pytest.fixture(scope="session")
def video_run(tmp_path_factory) -> VideoRun:
    return train_video_run(tmp_path_factory.mktemp("video_run"))


@pytest.fixture(scope="session")
def builtin_run(tmp_path_factory) -> Path:
    """``experiment=tiny`` on the built-in data: features only, no pixels."""
    run_dir = tmp_path_factory.mktemp("builtin_run") / "run"
    overrides = ["experiment=tiny", "trainer.accelerator=cpu", "logger.csv=false", f"output_dir={run_dir}"]
    result = launched.run(["train.py", *overrides], timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Write the test videos, extract their features, train a tiny run."
    )
    parser.add_argument("root", type=Path, help="a new folder: videos/, features/, tiny_clip/, run/")
    parser.add_argument("overrides", nargs="*", help="train.py overrides, e.g. trainer.max_steps=300")
    args = parser.parse_args()
    print(train_video_run(args.root, *args.overrides))


if __name__ == "__main__":
    main()
