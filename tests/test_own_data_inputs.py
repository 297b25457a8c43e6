"""A researcher's own videos and features: what the tools keep and what they say (found by a new
user's walk from videos to features, a packed store, a run, an export and the Python API)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

import train
from datamodules.feature_stores import FolderFeatureStore, StoreMismatchError
from tests.inference_runs import TRAIN_OVERRIDES, write_annotations
from timerefine.inference.frame_encoder import ENCODER_RECORD
from timerefine.inference.grounder import Grounder
from timerefine.inference.video_features import InputError, recorded_encoder
from timerefine.tools.export import main as export_main
from timerefine.tools.extract_features import videos_in
from timerefine.tools.pack_features import main as pack_main
from timerefine.tools.pack_features import pack_folder

D = 8
RECORD = {"model": "/models/clip", "projection": True, "fp16": False, "num_frames": 16, "dim": D}


@pytest.fixture
def features(tmp_path: Path) -> Path:
    folder = tmp_path / "features"
    folder.mkdir()
    for number in range(2):
        np.save(folder / f"vid_{number}.npy", np.ones((16, D), dtype=np.float16))
    (folder / ENCODER_RECORD).write_text(json.dumps(RECORD))
    return folder


def test_a_packed_store_keeps_the_extractions_encoder_record(features, tmp_path):
    """Before: the packed store had no encoder.json, so a run trained on it could not ground a video
    ("features were not made by timerefine-extract-features") and its export recorded no encoder."""
    pack_folder(features, tmp_path / "packed", num_frames=16, feature_dim=D)
    assert recorded_encoder(tmp_path / "packed") == recorded_encoder(features) is not None


def test_an_unreadable_encoder_record_stops_the_pack(features, tmp_path, capsys):
    (features / ENCODER_RECORD).write_text("{")
    assert pack_main([str(features), str(tmp_path / "packed"), "--feature-dim", str(D)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {features / ENCODER_RECORD}: not JSON")
    assert not (tmp_path / "packed").exists()


def test_packing_a_file_says_it_is_one(features, tmp_path, capsys):
    """Before: "no such folder of feature files", for a file that is there."""
    assert pack_main([str(features / "vid_0.npy"), str(tmp_path / "packed")]) == 2
    assert "vid_0.npy: a file, not a folder of feature files" in capsys.readouterr().err


def test_files_not_named_as_videos_are_named(tmp_path, caplog):
    """Before: b.m4v and c.mpg were left out in silence ("encoded 1, skipped 0 done, 0 failed"). A
    hidden video and a link to nowhere stay videos (the link fails, counted); the features written
    beside the videos are not warned of."""
    for name in ("a.mp4", "b.m4v", "c.MPG", ".d.mp4", "notes.txt", ".DS_Store", "a.npy", ENCODER_RECORD):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "e.mp4").symlink_to(tmp_path / "gone.mp4")
    with caplog.at_level(logging.WARNING):
        videos = videos_in(tmp_path, tmp_path / "out")
    assert [video.name for video in videos] == [".d.mp4", "a.mp4", "b.m4v", "c.MPG", "e.mp4"]
    assert "left out 3 files not named as videos (.mp4 .m4v" in caplog.text
    assert f"a.npy, {ENCODER_RECORD}, notes.txt\n" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        videos_in(tmp_path, tmp_path)  # features beside their videos
    assert "left out 1 files not named as videos" in caplog.text and "notes.txt\n" in caplog.text


def test_a_feature_folder_that_is_missing_or_packed_is_named(features, tmp_path, monkeypatch):
    """Before: training stopped on the first video's missing file, not on the folder."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StoreMismatchError) as error:
        FolderFeatureStore("featurez")
    assert str(error.value) == (
        f"data.source.feature_path=featurez: no such folder of feature files, relative to {tmp_path}"
    )
    pack_folder(features, tmp_path / "packed", num_frames=16, feature_dim=D)
    with pytest.raises(
        StoreMismatchError, match=r"a packed feature store; set data\.source\.features=packed"
    ):
        FolderFeatureStore(tmp_path / "packed")
    with pytest.raises(StoreMismatchError, match=r"vid_0\.npy: a file, not a folder of feature files$"):
        FolderFeatureStore(features / "vid_0.npy")


def test_packing_a_packed_store_says_it_is_one(features, tmp_path, capsys):
    """Before: data.source.feature_path=...: a packed feature store; set data.source.features=packed."""
    pack_folder(features, tmp_path / "packed", num_frames=16, feature_dim=D)
    assert pack_main([str(tmp_path / "packed"), str(tmp_path / "again"), "--feature-dim", str(D)]) == 2
    message = f"error: {tmp_path / 'packed'}: a packed feature store already; pack a folder of feature files"
    assert capsys.readouterr().err.strip() == message


def test_the_api_names_a_wrong_argument(builtin_run):
    """Before: an AttributeError (an array for Features), a TypeError (no queries), and a folder
    given for a video called missing."""
    grounder = Grounder.from_run(builtin_run)
    array = np.zeros((grounder.run.num_frames, grounder.run.feature_dim), dtype=np.float32)
    with pytest.raises(InputError, match=r"^pair 1: must be \(Features, query\), got \(ndarray, str\)"):
        grounder.ground_pairs([(array, "a person opens a door")])
    with pytest.raises(InputError, match=r"^queries: give a text or texts, got NoneType"):
        grounder.ground(array, None, duration=6.0)
    assert len(grounder.ground(array, np.array(["a door opens", "a person sits"]), duration=6.0)) == 2
    with pytest.raises(InputError, match=rf"^{builtin_run}: a folder, not a file$"):  # was: no such file
        grounder.features(builtin_run)


def test_an_export_says_when_it_cannot_ground_videos(video_run, tmp_path, capsys):
    """Before: exit 0 and `"encoder": null` in export.json without a word, when the run's feature
    folder holds no encoder.json (moved, packed before packing kept it, or a relative path)."""
    run, features = tmp_path / "run", tmp_path / "features"
    shutil.copytree(video_run.run_dir, run)
    shutil.copytree(video_run.features, features)
    (features / ENCODER_RECORD).unlink()
    config = run / "config.yaml"
    config.write_text(config.read_text().replace(str(video_run.features), str(features)))
    assert export_main([str(run), str(tmp_path / "export")]) == 0
    assert capsys.readouterr().err == (
        f"note: no {features / ENCODER_RECORD}: the export grounds feature files; for videos, give an "
        "encoder (timerefine-predict --encoder, Grounder's encoder argument)\n"
    )


def test_an_export_of_made_features_has_no_encoder_to_miss(tmp_path, capsys):
    """Features made by a generator (``synthetic``) leave ``feature_path`` unread: no CLIP encoder
    could make them, so the export's note would mislead."""
    run = tmp_path / "run"
    overrides = [
        *TRAIN_OVERRIDES,
        f"data.source.root={write_annotations(tmp_path / 'annotations')}",
        "data.source.features=synthetic",
        f"data.source.feature_path={tmp_path}",
        f"output_dir={run}",
    ]
    assert train.main(overrides) == 0
    capsys.readouterr()
    assert export_main([str(run), str(tmp_path / "export")]) == 0
    assert "note:" not in capsys.readouterr().err


def packing_started(tmp_path: Path) -> tuple[subprocess.Popen, list[psutil.Process]]:
    """``timerefine-pack-features`` on 1,500 files with 2 workers, in a process group of its own (as a
    shell's foreground job), once its packing processes run (a resource tracker, the packing child and
    its 2 workers): (the command, its processes)."""
    src = tmp_path / "features"
    src.mkdir()
    for number in range(1500):
        np.save(src / f"v{number:05d}.npy", np.ones((16, D), dtype=np.float16))
    command = [sys.executable, "-m", "timerefine.tools.pack_features", str(src), str(tmp_path / "packed")]
    packing = subprocess.Popen(
        [*command, "--num-frames", "16", "--feature-dim", str(D), "--workers", "2"],
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[1],
        start_new_session=True,
    )
    parent, deadline = psutil.Process(packing.pid), time.monotonic() + 120
    while len(children := parent.children(recursive=True)) < 4 and packing.poll() is None:
        assert time.monotonic() < deadline, "the packing processes never started"
        time.sleep(0.05)
    return packing, children


def test_sigterm_stops_the_packing_processes_too(tmp_path):
    """Before (review): the command ended with 143 and its litdata workers packed on, orphaned."""
    packing, children = packing_started(tmp_path)
    packing.send_signal(signal.SIGTERM)
    assert packing.wait(timeout=60) == 143
    _, alive = psutil.wait_procs(children, timeout=20)
    assert not alive, [p.cmdline() for p in alive]
    assert "stopped by SIGTERM" in packing.stderr.read()


@pytest.mark.parametrize("whole_group", [True, False], ids=["ctrl-c", "kill-int"])
def test_ctrl_c_says_the_packing_stopped(tmp_path, whole_group):
    """Before: litdata's SIGINT handler ended the command with os._exit(0), as if it had packed all,
    leaving an incomplete folder without its index (``pack && train`` went on)."""
    packing, children = packing_started(tmp_path)
    if whole_group:  # a terminal's Ctrl-C: every process of the foreground job
        os.killpg(packing.pid, signal.SIGINT)
    else:
        packing.send_signal(signal.SIGINT)
    assert packing.wait(timeout=60) == 130
    _, alive = psutil.wait_procs(children, timeout=20)
    assert not alive, [p.cmdline() for p in alive]
    said = f"interrupted: {tmp_path / 'packed'} is incomplete; delete it before packing again"
    assert said in packing.stderr.read().splitlines()  # beside the killed workers' semaphore warnings
