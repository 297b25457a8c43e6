"""Extract per-frame CLIP features from videos: ``{video_id}.npy`` float16 ``(num_frames, D)`` files.

    timerefine-extract-features VIDEO_DIR OUT_DIR --model openai/clip-vit-large-patch14 \\
        --num-frames 100 --batch-size 100 --device cuda --fp16

Frames are decoded with PyAV in DataLoader workers at ``linspace(0, T - 1, n)`` (first and last frame
included, as VTimeLLM samples them: the frame placement of every timeline in
``timerefine/answer_format/timeline.py``), resized and centre-cropped to the encoder's image size, CLIP-normalised and encoded; the projected image embedding (or, with
``--no-projection``, the pooled output) is kept per frame. Finished videos are skipped, outputs are
written atomically, and undecodable videos are counted and reported (or raise with ``--strict``).
``OUT_DIR/encoder.json`` records the encoder and frame count, so a trained run can encode a new video
the same way (``timerefine-predict``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from timerefine.answer_format.timeline import sample_frame_indices

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")
ENCODER_RECORD = "encoder.json"


class VideoDecodeError(Exception):
    """A video could not be decoded; the message names the file."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"cannot decode video {path}: {reason}")
        self.path, self.reason = str(path), reason

    def __reduce__(self) -> tuple:  # survives the trip back from DataLoader workers
        return type(self), (self.path, self.reason)


def _frame_count(path: str | Path) -> int:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return stream.frames or sum(1 for packet in container.demux(stream) if packet.size)


@dataclass(frozen=True)
class SampledFrames:
    """``n`` uniformly spaced RGB frames, uint8 ``(n, H, W, 3)``, and how much of the video decoded:
    ``decoded`` of the ``promised`` frames, the last one ending ``end`` seconds into the stream (None
    when the frames carry no time)."""

    frames: np.ndarray
    decoded: int
    promised: int
    end: float | None


def sample_frames(path: str | Path, n: int, size: int | None = None) -> SampledFrames:
    """Decode ``n`` uniformly spaced frames; ``size`` scales the short side. Frames the header
    promises but the stream lacks repeat the last decoded one (``decoded`` says how many there were)."""
    try:
        promised = _frame_count(path)
        wanted = sample_frame_indices(promised, n)
        wanted_set, last_wanted = set(wanted.tolist()), int(wanted[-1])
        picked: dict[int, np.ndarray] = {}
        decoded, end = 0, None
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            scale = (
                {} if size is None else _scaled(stream.codec_context.width, stream.codec_context.height, size)
            )
            start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
            step = 1 / float(stream.average_rate) if stream.average_rate else 0.0
            for i, frame in enumerate(container.decode(stream)):
                decoded = i + 1
                if frame.time is not None:
                    end = max(end or 0.0, frame.time - start + step)
                if i in wanted_set:
                    picked[i] = frame.to_ndarray(format="rgb24", **scale)
                if i >= last_wanted:
                    break
    except (av.FFmpegError, IndexError, ValueError) as err:
        raise VideoDecodeError(path, f"{type(err).__name__}: {err}") from err
    if not picked:
        raise VideoDecodeError(path, "no frame could be decoded")
    last = picked[max(picked)]
    return SampledFrames(np.stack([picked.get(int(i), last) for i in wanted]), decoded, promised, end)


def decode_uniform_frames(path: str | Path, n: int, size: int | None = None) -> np.ndarray:
    """Decode ``n`` uniformly spaced RGB frames as uint8 ``(n, H, W, 3)``; ``size`` scales the short side."""
    return sample_frames(path, n, size).frames


def _scaled(width: int, height: int, size: int) -> dict[str, int]:
    ratio = size / min(width, height)
    return {"width": max(size, round(width * ratio)), "height": max(size, round(height * ratio))}


def preprocess(frames: np.ndarray, image_size: int) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` frames to CLIP-normalised float ``(N, 3, image_size, image_size)``."""
    transform = v2.Compose(
        [
            v2.Resize(image_size, antialias=True),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )
    return transform(torch.from_numpy(frames).permute(0, 3, 1, 2))


class ClipFrameEncoder:
    """A transformers CLIP vision tower (hub name or local path) mapping frames to embeddings."""

    def __init__(self, name_or_path: str, projection: bool = True, device: str = "cpu", fp16: bool = False):
        from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

        model_class = CLIPVisionModelWithProjection if projection else CLIPVisionModel
        self.dtype = torch.float16 if fp16 else torch.float32
        self.model = model_class.from_pretrained(name_or_path).eval().to(device, self.dtype)
        self.name_or_path, self.device, self.projection, self.fp16 = name_or_path, device, projection, fp16
        config = self.model.config
        self.image_size = config.image_size
        self.dim = config.projection_dim if projection else config.hidden_size

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixels.to(self.device, self.dtype))
        return (out.image_embeds if self.projection else out.pooler_output).float().cpu()


def video_pixels(path: str | Path, num_frames: int, image_size: int) -> torch.Tensor:
    """``num_frames`` uniformly sampled frames of a video, preprocessed for the encoder."""
    return preprocess(decode_uniform_frames(path, num_frames, image_size), image_size)


def encode_pixels(encoder: ClipFrameEncoder, pixels: torch.Tensor, batch_size: int) -> np.ndarray:
    """Frame embeddings ``(N, encoder.dim)`` as stored: float16."""
    return torch.cat([encoder(batch) for batch in pixels.split(batch_size)]).numpy().astype(np.float16)


def encoder_record(encoder: ClipFrameEncoder, num_frames: int) -> dict[str, object]:
    """What encoded the features: the model (a local path made absolute), its output, frames per video."""
    local = Path(encoder.name_or_path)
    return {
        "model": str(local.resolve()) if local.exists() else encoder.name_or_path,
        "projection": encoder.projection,
        "fp16": encoder.fp16,
        "num_frames": num_frames,
        "dim": encoder.dim,
    }


class _VideoFrames(Dataset):
    """Decoded, preprocessed frames per video; a decode failure is returned, not raised."""

    def __init__(self, paths: Sequence[Path], num_frames: int, image_size: int) -> None:
        self.paths, self.num_frames, self.image_size = paths, num_frames, image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[str, torch.Tensor | VideoDecodeError]:
        try:
            return self.paths[i].stem, video_pixels(self.paths[i], self.num_frames, self.image_size)
        except VideoDecodeError as err:
            return self.paths[i].stem, err


@dataclass
class ExtractReport:
    """Videos encoded now, skipped as already done, and failed (video id -> error message)."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def is_complete(path: Path, num_frames: int, dim: int) -> bool:
    """Whether ``path`` already holds a loadable, finite ``(num_frames, dim)`` array."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        return array.shape == (num_frames, dim) and bool(np.isfinite(array).all())
    except (OSError, ValueError):
        return False


def save_atomic(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to a temporary file next to ``path``, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def extract(
    videos: Sequence[str | Path],
    encoder: ClipFrameEncoder,
    out_dir: str | Path,
    num_frames: int = 100,
    batch_size: int = 100,
    workers: int = 0,
    strict: bool = False,
) -> ExtractReport:
    """Encode each video's frames to ``out_dir/{video_id}.npy`` (float16), skipping finished ones."""
    out_dir, report = Path(out_dir), ExtractReport()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / ENCODER_RECORD).write_text(json.dumps(encoder_record(encoder, num_frames), indent=2) + "\n")
    todo = []
    for path in map(Path, videos):
        if is_complete(out_dir / f"{path.stem}.npy", num_frames, encoder.dim):
            report.skipped.append(path.stem)
        else:
            todo.append(path)
    frames = _VideoFrames(todo, num_frames, encoder.image_size)
    for video_id, pixels in DataLoader(frames, batch_size=None, num_workers=workers):
        if isinstance(pixels, VideoDecodeError):
            if strict:
                raise pixels
            log.warning("skipped: %s", pixels)
            report.failed[video_id] = str(pixels)
            continue
        save_atomic(out_dir / f"{video_id}.npy", encode_pixels(encoder, pixels, batch_size))
        report.done.append(video_id)
    log.info(
        "encoded %d, skipped %d done, %d failed", len(report.done), len(report.skipped), len(report.failed)
    )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("video_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--model", default="openai/clip-vit-large-patch14", help="hub name or local path")
    parser.add_argument(
        "--no-projection", action="store_true", help="keep the pooled output, not the projection"
    )
    parser.add_argument("--num-frames", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=100, help="frames per encoder forward pass")
    parser.add_argument("--workers", type=int, default=2, help="decoding processes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--strict", action="store_true", help="stop at the first undecodable video")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    videos = sorted(p for p in args.video_dir.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
    encoder = ClipFrameEncoder(args.model, not args.no_projection, args.device, args.fp16)
    report = extract(
        videos, encoder, args.out_dir, args.num_frames, args.batch_size, args.workers, args.strict
    )
    print(f"encoded {len(report.done)}, skipped {len(report.skipped)} done, {len(report.failed)} failed")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
