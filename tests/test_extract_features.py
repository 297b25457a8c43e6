"""Frame sampling, decoding and CLIP feature extraction on tiny generated videos and a tiny encoder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

import evaluate
from datamodules.feature_stores import FolderFeatureStore
from grounding.answer_format.timeline import sample_frame_indices
from tests.inference_runs import (
    damaged_copy,
    truncated_copy,
    write_audio_only,
    write_moment_video,
    write_still,
    write_timed_video,
)
from timerefine.inference.frame_encoder import (
    ClipFrameEncoder,
    VideoDecodeError,
    decode_uniform_frames,
    preprocess,
)
from timerefine.inference.video_features import InputError, encoder_change_error, frame_coverage
from timerefine.pipeline.config import load_config
from timerefine.tools.extract_features import extract, main

FRAMES = 20  # 2 s at 10 fps


def write_video(path: Path, frames: int = FRAMES, size: tuple[int, int] = (64, 48)) -> Path:
    """Frame i is a flat grey of level 12 * i, so decoded brightness tells the frame index."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
        for i in range(frames):
            image = np.full((size[1], size[0], 3), 12 * i, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("clip")
    CLIPVisionModelWithProjection(config).save_pretrained(root / "proj")
    CLIPVisionModel(config).save_pretrained(root / "pooled")
    return root


@pytest.fixture
def videos(tmp_path: Path) -> Path:
    root = tmp_path / "videos"
    root.mkdir()
    write_video(root / "vid_a.mp4")
    write_video(root / "vid_b.mkv", frames=7, size=(48, 64))  # mkv: no frame count in the header
    return root


def test_sample_frame_indices_include_the_first_and_last_frame():
    """VTimeLLM's ``np.linspace(0, T - 1, n, dtype=np.int32)``: frame k of n shows k / (n - 1) of the video."""
    assert sample_frame_indices(20, 4).tolist() == [0, 6, 12, 19]  # 0, 6.33, 12.67, 19 truncated
    assert sample_frame_indices(3, 6).tolist() == [0, 0, 0, 1, 1, 2]
    assert sample_frame_indices(1, 2).tolist() == [0, 0]
    assert sample_frame_indices(1000, 100).tolist() == np.linspace(0, 999, 100, dtype=np.int32).tolist()
    with pytest.raises(ValueError, match="total > 0"):
        sample_frame_indices(0, 4)


def test_decode_uniform_frames(videos):
    frames = decode_uniform_frames(videos / "vid_a.mp4", 4)
    assert frames.shape == (4, 48, 64, 3) and frames.dtype == np.uint8
    levels = frames.reshape(4, -1).mean(1) / 12
    np.testing.assert_allclose(levels, [0, 6, 12, 19], atol=0.6)
    portrait = decode_uniform_frames(videos / "vid_b.mkv", 10, size=32)  # short side scaled to 32
    assert portrait.shape == (10, 43, 32, 3)


def test_preprocess_is_clip_normalised():
    frames = np.zeros((2, 48, 64, 3), np.uint8)
    pixels = preprocess(frames, 32)
    assert pixels.shape == (2, 3, 32, 32)
    torch.testing.assert_close(
        pixels[0, :, 0, 0], torch.tensor([-1.7923, -1.7521, -1.4802]), atol=1e-3, rtol=0
    )


def test_corrupt_video_raises_clear_error(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    with pytest.raises(VideoDecodeError, match=re.escape(f"cannot decode video {bad}")):
        decode_uniform_frames(bad, 4)


@pytest.mark.parametrize(("model", "dim"), [("proj", 16), ("pooled", 32)])
def test_extract_writes_float16_features_and_resumes(tiny_clip, videos, tmp_path, model, dim):
    encoder = ClipFrameEncoder(str(tiny_clip / model), projection=model == "proj")
    assert (encoder.image_size, encoder.dim) == (32, dim)
    paths = sorted(videos.iterdir())
    out = tmp_path / "feats"
    report = extract(paths, encoder, out, num_frames=8, batch_size=3)
    assert report.done == ["vid_a", "vid_b"] and not report.skipped and not report.failed
    features = np.load(out / "vid_a.npy")
    assert features.shape == (8, dim) and features.dtype == np.float16 and np.isfinite(features).all()
    assert not np.allclose(features[0], features[-1])  # different frames, different embeddings
    assert sorted(p.name for p in out.iterdir()) == [
        "encoder.json",
        "vid_a.npy",
        "vid_b.npy",
    ]  # no temp files
    record = json.loads((out / "encoder.json").read_text())
    assert record == {
        "model": str(tiny_clip / model),
        "projection": model == "proj",
        "fp16": False,
        "num_frames": 8,
        "dim": dim,
    }
    assert FolderFeatureStore(out, num_frames=8, feature_dim=dim).load("vid_b").shape == (8, dim)

    first_b = np.load(out / "vid_b.npy")
    (out / "vid_b.npy").write_bytes(b"truncated")  # e.g. a killed run: redone, not trusted
    again = extract(paths, encoder, out, num_frames=8, batch_size=3)
    assert again.skipped == ["vid_a"] and again.done == ["vid_b"]
    np.testing.assert_array_equal(np.load(out / "vid_b.npy"), first_b)


def test_extract_counts_or_raises_on_corrupt_video(tiny_clip, videos, tmp_path):
    (videos / "vid_c.mp4").write_bytes(b"not a video")
    encoder = ClipFrameEncoder(str(tiny_clip / "proj"))
    paths = sorted(videos.iterdir())
    with pytest.raises(VideoDecodeError, match=r"vid_c\.mp4"):
        extract(paths, encoder, tmp_path / "strict", num_frames=4, strict=True)
    report = extract(paths, encoder, tmp_path / "lenient", num_frames=4, workers=1)
    assert report.done == ["vid_a", "vid_b"] and list(report.failed) == ["vid_c"]
    assert "vid_c.mp4" in report.failed["vid_c"]


def test_decoding_workers_are_new_interpreters_not_forks_of_the_caller(
    tiny_clip, videos, tmp_path, monkeypatch
):
    """Before: workers were forks, copies of the caller with the locks its other threads held (a
    progress bar's monitor, FFmpeg's decoders); a CI run hung in one. A fork would run this patch."""
    import timerefine.tools.extract_features as extract_features

    def inherited(path):
        raise VideoDecodeError(path, "a copy of the caller's memory")

    monkeypatch.setattr(extract_features, "probe_video", inherited)
    encoder = ClipFrameEncoder(str(tiny_clip / "proj"))
    report = extract(sorted(videos.iterdir()), encoder, tmp_path / "out", num_frames=4, workers=1)
    assert report.done == ["vid_a", "vid_b"] and not report.failed


def test_a_still_image_is_not_extracted_as_a_video(tiny_clip, videos, tmp_path):
    """Before: a PNG named .mp4 and a one-frame video were encoded as videos of 0.04 s."""
    write_still(videos / "still.mp4")
    write_video(videos / "one_frame.mp4", frames=1)
    encoder = ClipFrameEncoder(str(tiny_clip / "proj"))
    report = extract(sorted(videos.iterdir()), encoder, tmp_path / "out", num_frames=4)
    assert report.done == ["vid_a", "vid_b"] and sorted(report.failed) == ["one_frame", "still"]
    for name in ("still", "one_frame"):
        assert report.failed[name].endswith(
            f"{videos / name}.mp4: a single frame (a still image?), not a video"
        )
        assert not (tmp_path / "out" / f"{name}.npy").exists()


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_a_truncated_video_is_not_extracted_as_if_whole(tiny_clip, tmp_path, suffix):
    """Before: a file of which half decodes was encoded from that half (its last frame repeated, or
    its frames spread over the whole length) and saved as the video's features."""
    whole = write_moment_video(tmp_path / f"whole{suffix}", 10.0, "red", 2.0, 4.0, faststart=suffix == ".mp4")
    cut = truncated_copy(whole, tmp_path / f"cut{suffix}", keep=0.5)
    encoder = ClipFrameEncoder(str(tiny_clip / "proj"))
    report = extract([whole, cut], encoder, tmp_path / "out", num_frames=8)
    assert report.done == ["whole"] and list(report.failed) == ["cut"]
    assert report.failed["cut"].startswith(f"cannot decode video {cut}: only ")
    assert report.failed["cut"].endswith("the file is truncated or damaged")
    assert not (tmp_path / "out" / "cut.npy").exists()
    with pytest.raises(VideoDecodeError, match="truncated or damaged"):
        extract([cut], encoder, tmp_path / "strict", num_frames=8, strict=True)


VARIABLE_RATE = [i / 40 for i in range(80)] + [2 + i * 0.38 for i in range(20)]  # 80 in 2 s, 20 after
NTSC = [i * 1.001 / 30 for i in range(60)]  # 29.97 fps: intervals of 33 and 34 ms
DROPPED = [i / 10 for i in range(100) if i not in (20, 50, 51, 80)]  # a few dropped frames


def test_frames_cover_their_intervals_up_to_two_and_the_rest_is_a_gap():
    """A dropped frame (two intervals) is no gap, two are; so is time before the first frame."""
    dropped = frame_coverage(np.array(DROPPED))
    assert dropped.seconds == pytest.approx(9.9) and dropped.gaps == [
        (pytest.approx(5.0), pytest.approx(5.2))
    ]
    assert frame_coverage(np.array(NTSC)).seconds == pytest.approx(60 * 1.001 / 30)
    late = frame_coverage(np.arange(10, 20) / 10)
    assert late.seconds == pytest.approx(1.1) and late.gaps == [(0.0, 1.0)]
    assert frame_coverage(np.array([2.0])) is None


def test_a_video_with_frames_missing_mid_stream_is_not_extracted(tiny_clip, tmp_path):
    """Before: a file damaged in the middle (its frames and their packets lost, the last frame at
    its end) and one with a variable frame rate were encoded as if their frames were evenly spread.
    A constant frame rate with timestamp jitter or a few dropped frames is still encoded."""
    damaged = damaged_copy(
        write_moment_video(tmp_path / "whole.mkv", 10.0, "red", 2.0, 4.0), tmp_path / "damaged.mkv"
    )
    videos = [
        damaged,
        write_timed_video(tmp_path / "variable.mkv", VARIABLE_RATE),
        write_timed_video(tmp_path / "ntsc.mkv", NTSC, fps=30000 / 1001),
        write_timed_video(tmp_path / "dropped.mkv", DROPPED),
    ]
    report = extract(videos, ClipFrameEncoder(str(tiny_clip / "proj")), tmp_path / "out", num_frames=16)
    assert report.done == ["ntsc", "dropped"] and list(report.failed) == ["damaged", "variable"]
    assert re.fullmatch(
        rf"cannot decode video {re.escape(str(damaged))}: frames missing between 2\.\d0 s and 5\.\d0 s "
        r"\(they cover \d+% of its 10\.00 s: damaged, or a variable frame rate\): the answer's times would be wrong",
        report.failed["damaged"],
    ), report.failed["damaged"]
    assert re.search(
        r": frames missing in 19 gaps between 2\.0\d s and 9\.22 s \(they cover 3\d% of its 9\.32 s",
        report.failed["variable"],
    ), report.failed["variable"]


def test_an_audio_file_is_skipped_as_having_no_video_stream(tiny_clip, tmp_path):
    """Before: skipped as "cannot decode video ...: IndexError: tuple index out of range"."""
    audio = write_audio_only(tmp_path / "audio.mp4")
    report = extract([audio], ClipFrameEncoder(str(tiny_clip / "proj")), tmp_path / "out", num_frames=4)
    assert report.failed == {"audio": f"cannot decode video {audio}: {audio}: has no video stream"}


def test_cli(tiny_clip, videos, tmp_path, capsys):
    args = [str(videos), str(tmp_path / "out"), "--model", str(tiny_clip / "proj"), "--num-frames", "5"]
    assert main([*args, "--workers", "0", "--device", "cpu"]) == 0
    assert "encoded 2, skipped 0 done, 0 failed" in capsys.readouterr().out
    assert main([*args, "--workers", "0", "--device", "cpu"]) == 0
    assert "encoded 0, skipped 2 done" in capsys.readouterr().out


def test_two_videos_of_one_name_are_refused(tiny_clip, videos, tmp_path):
    """Before: ``x.mp4`` and ``x.mkv`` were both "encoded", the second over the first's file."""
    twin = videos / "vid_a.mkv"
    twin.write_bytes((videos / "vid_a.mp4").read_bytes())
    encoder = ClipFrameEncoder(str(tiny_clip / "proj"))
    with pytest.raises(
        InputError, match=re.escape(f"{videos / 'vid_a.mkv'} and {videos / 'vid_a.mp4'}: both")
    ):
        extract(sorted(videos.iterdir()), encoder, tmp_path / "out", num_frames=4)
    assert not (tmp_path / "out").exists()


def test_features_of_another_encoder_are_not_mixed_in(tiny_clip, videos, tmp_path):
    """Before: a re-run with another encoder skipped the old files and recorded the new encoder."""
    out, paths = tmp_path / "out", sorted(videos.iterdir())
    extract(paths, ClipFrameEncoder(str(tiny_clip / "proj")), out, num_frames=4)
    recorded = (out / "encoder.json").read_text()
    other = ClipFrameEncoder(str(tiny_clip / "pooled"), projection=False)
    with pytest.raises(
        InputError, match=f"^{re.escape(str(out / 'encoder.json'))}: .* made otherwise \\(model "
    ):
        extract(paths, other, out, num_frames=4)
    with pytest.raises(InputError, match="num_frames 4 -> 5"):
        extract(paths, ClipFrameEncoder(str(tiny_clip / "proj")), out, num_frames=5)
    assert (out / "encoder.json").read_text() == recorded
    again = extract(paths, ClipFrameEncoder(str(tiny_clip / "proj")), out, num_frames=4)
    assert again.skipped == ["vid_a", "vid_b"]


@pytest.mark.parametrize(
    ("model", "frames", "refused"),
    [("pooled", 4, "model "), ("proj", 5, None), ("proj", 4, None), (None, 4, None)],  # frames resample
)
def test_an_evaluation_on_features_of_another_encoder_is_refused(
    tiny_clip, videos, tmp_path, capsys, model, frames, refused
):
    """Before: evaluate.py <run> data.source.feature_path=<features another encoder made> scored the
    run on them, exit 0. A folder without encoder.json stays unchecked."""
    paths = sorted(videos.iterdir())
    extract(paths, ClipFrameEncoder(str(tiny_clip / "proj")), tmp_path / "trained", num_frames=4)
    other = tmp_path / "other"
    if model is None:
        other.mkdir()
    else:
        extract(paths, ClipFrameEncoder(str(tiny_clip / model), model == "proj"), other, num_frames=frames)
    run = tmp_path / "run"
    run.mkdir()
    trained = [
        "data=charades_sta",
        "data.source.features=folder",
        f"data.source.feature_path={tmp_path / 'trained'}",
    ]
    OmegaConf.save(load_config([*trained, f"output_dir={run}"]), run / "config.yaml")
    capsys.readouterr()  # the encoders' loading bars
    assert evaluate.main([str(run), f"data.source.feature_path={other}"]) == 2
    error = capsys.readouterr().err.strip()
    if refused is None:  # past the config checks: the run has no checkpoint
        assert error.startswith("error: ") and str(run / "checkpoints") in error
        return
    records = f"{other / 'encoder.json'} records other features than the run's {tmp_path / 'trained' / 'encoder.json'}"
    assert error.startswith(f"config error: data.source.feature_path={other}: {records} (")
    assert len(error.splitlines()) == 1 and refused in error


@pytest.mark.parametrize(
    ("record", "refused"),
    [
        ({"model": "openai/clip-vit-large-patch14"}, None),  # the hub name of the local copy
        ({"model": "/hf/models--openai--clip-vit-large-patch14/snapshots/0a1b"}, None),  # its cache
        ({"fp16": True, "num_frames": 32}, None),  # the same features, another precision and sampling
        ({"projection": False}, "projection True -> False"),
        ({"model": "/models/clip-vit-base-patch32"}, "model /models/clip-vit-large-patch14 -> "),
    ],
)
def test_an_encoder_is_compared_by_the_features_it_makes(tmp_path, record, refused):
    """Before (this session's first version of the check): a local copy of the same model, or features
    sampled at other frame counts, were refused with no way round it."""
    trained = {
        "model": "/models/clip-vit-large-patch14",
        "projection": True,
        "fp16": False,
        "num_frames": 100,
    }
    configs = []
    for name, spec in (("trained", trained), ("other", trained | record)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "encoder.json").write_text(json.dumps(spec))
        configs.append(
            OmegaConf.create(
                {"data": {"source": {"features": "folder", "feature_path": str(tmp_path / name)}}}
            )
        )
    reason = encoder_change_error(*configs)
    assert reason is None if refused is None else refused in reason


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a, t: [str(t / "absent"), *a[1:]], "absent: no such folder"),
        (lambda a, t: [str(t), *a[1:]], "holds no video"),
        (lambda a, t: [*a, "--device", "nowhere"], "--device nowhere: not a device"),
        (lambda a, t: [*a[:3], str(t / "no_model"), *a[4:]], "--model"),
        (lambda a, t: [*a, "--strict"], "cannot decode video"),
    ],
)
def test_cli_mistakes_are_one_line(tiny_clip, videos, tmp_path, capsys, change, message):
    """Before: tracebacks (FileNotFoundError, OSError, RuntimeError, VideoDecodeError), exit 1."""
    (videos / "vid_c.mp4").write_bytes(b"not a video")
    args = [
        str(videos),
        str(tmp_path / "out"),
        "--model",
        str(tiny_clip / "proj"),
        "--num-frames",
        "4",
        "--workers",
        "0",
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(change(args, empty)) == 2
    err = capsys.readouterr().err  # the encoder's loading bar may come first
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err


@pytest.mark.parametrize("flag", [["--num-frames", "0"], ["--batch-size", "0"], ["--workers", "-1"]])
def test_impossible_counts_are_refused_by_the_parser(tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path), str(tmp_path / "out"), *flag])
    assert exit_.value.code == 2 and "must be an integer >=" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
