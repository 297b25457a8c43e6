"""Frames of a video to CLIP embeddings, as the features a run was trained on were made.

Frames are decoded with PyAV at ``linspace(0, T - 1, n)`` (first and last frame included, as VTimeLLM
samples them: the frame placement of every timeline in ``grounding/answer_format/timeline.py``),
resized and centre-cropped to the encoder's image size, CLIP-normalised and encoded; the projected image
embedding (or the pooled output) is kept per frame. ``timerefine-extract-features`` runs it over a
folder of videos; the grounder runs it on one new video.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
from torchvision.transforms import v2

from grounding.answer_format.timeline import sample_frame_indices
from lightning_modules.pretrained import MissingModelError, check_hub_name

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
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
    when the frames carry no time), and the decoded frames' ``times`` (seconds into the stream)."""

    frames: np.ndarray
    decoded: int
    promised: int
    end: float | None
    times: np.ndarray


def stream_start(stream: av.video.stream.VideoStream) -> float:
    """Seconds of the stream's first timestamp (0 when unset): a video's times count from it (a copy
    cut without re-encoding can start at 2 s)."""
    return float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0


def sample_frames(path: str | Path, n: int, size: int | None = None) -> SampledFrames:
    """Decode ``n`` uniformly spaced frames; ``size`` scales the short side. Frames the header
    promises but the stream lacks repeat the last decoded one (``decoded`` says how many there were)."""
    try:
        promised = _frame_count(path)
        wanted = sample_frame_indices(promised, n)
        wanted_set = set(wanted.tolist())
        picked: dict[int, np.ndarray] = {}
        decoded, end, times = 0, None, []
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            scale = (
                {} if size is None else _scaled(stream.codec_context.width, stream.codec_context.height, size)
            )
            start = stream_start(stream)
            step = 1 / float(stream.average_rate) if stream.average_rate else 0.0
            for i, frame in enumerate(container.decode(stream)):
                decoded = i + 1
                if frame.time is not None:
                    times.append(frame.time - start)
                    end = max(end or 0.0, times[-1] + step)
                if i in wanted_set:
                    picked[i] = frame.to_ndarray(format="rgb24", **scale)
                if i >= promised - 1:  # to the last frame, whatever is wanted: how much decodes
                    break
    except (av.FFmpegError, IndexError, ValueError) as err:
        raise VideoDecodeError(path, f"{type(err).__name__}: {err}") from err
    if not picked:
        raise VideoDecodeError(path, "no frame could be decoded")
    last = picked[max(picked)]
    frames = np.stack([picked.get(int(i), last) for i in wanted])
    return SampledFrames(frames, decoded, promised, end, np.array(times))


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


class EncoderLoadError(ValueError):
    """A model that cannot be read, or is not a CLIP vision tower with the weights asked for."""


def clip_vision_model(name_or_path: str, projection: bool) -> torch.nn.Module:
    """The CLIP vision tower of ``name_or_path`` (with its projection, or without); EncoderLoadError
    when it cannot be read or lacks weights: transformers would start them at random, in silence."""
    from transformers import CLIPVisionModel, CLIPVisionModelWithProjection
    from transformers.utils import logging as transformers_logging

    try:
        check_hub_name(name_or_path)  # before: transformers' retries, or "Repo id must be in the form ..."
    except MissingModelError as error:
        raise EncoderLoadError(str(error).removeprefix(f"{name_or_path}: ")) from error
    model_class = CLIPVisionModelWithProjection if projection else CLIPVisionModel
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # its load report: weights left unread are expected
    try:
        model, loading = model_class.from_pretrained(
            name_or_path,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # named below
        )
    except (OSError, RuntimeError, ValueError) as error:
        raise EncoderLoadError(f"cannot load it ({' '.join(str(error).split())})") from error
    finally:
        transformers_logging.set_verbosity(verbosity)
    if mismatched := sorted(loading["mismatched_keys"]):
        key, stored, expected = mismatched[0]
        raise EncoderLoadError(
            f"{len(mismatched)} of its weights have other shapes than its config.json gives, e.g. {key} "
            f"{list(stored)} where {list(expected)} is expected"
        )
    if missing := sorted(loading["missing_keys"]):
        if missing == ["visual_projection.weight"]:
            raise EncoderLoadError(
                "a vision tower without a projection: its pooled output is what it gives "
                "(timerefine-extract-features --no-projection)"
            )
        raise EncoderLoadError(
            f"not a CLIP vision model (model_type {model.config.model_type}): {len(missing)} of its "
            f"weights are missing, e.g. {missing[0]}"
        )
    return model


class ClipFrameEncoder:
    """A transformers CLIP vision tower (hub name or local path) mapping frames to embeddings;
    EncoderLoadError when it cannot be read or is no such tower."""

    def __init__(self, name_or_path: str, projection: bool = True, device: str = "cpu", fp16: bool = False):
        self.dtype = torch.float16 if fp16 else torch.float32
        self.model = clip_vision_model(name_or_path, projection).eval().to(device, self.dtype)
        self.name_or_path, self.device, self.projection, self.fp16 = name_or_path, device, projection, fp16
        config = self.model.config
        self.image_size = config.image_size
        self.dim = config.projection_dim if projection else config.hidden_size

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixels.to(self.device, self.dtype))
        return (out.image_embeds if self.projection else out.pooler_output).float().cpu()


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
