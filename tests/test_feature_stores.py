"""Folder, packed, synthetic and built-in feature stores, the pack tool, the coverage check, and
every store read through GroundingDataset and a DataLoader."""

from __future__ import annotations

import json
import multiprocessing
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from datamodules import builtin, feature_stores
from datamodules.builtin import BuiltinFeatureStore, BuiltinSpec, builtin_records, make_sample
from datamodules.coverage import check_coverage
from datamodules.dataset import GroundingDataset
from datamodules.feature_stores import (
    FolderFeatureStore,
    PackedFeatureStore,
    StoreIndexError,
    StoreMismatchError,
    SyntheticFeatureStore,
    build_feature_store,
)
from datamodules.synthetic_features import query_signature, stable_seed
from grounding.answer_format.timeline import frame_times
from grounding.records import FeatureError, FeatureStore, GroundingRecord
from timerefine.pipeline.errors import INPUT_ERRORS
from timerefine.tools.pack_features import main as pack_main
from timerefine.tools.pack_features import pack_folder

D = 8


def features(frames: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((frames, D)).astype(np.float16)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "feats"
    root.mkdir()
    np.save(root / "vid_a.npy", features(10, 1))
    np.savez(root / "vid_b.npz", other=features(4, 2), features=features(20, 3))
    np.savez(root / "vid_c.npz", features(6, 4))
    torch.save(torch.from_numpy(features(5, 5)), root / "vid_d.pt")
    return root


def test_folder_store_formats_and_resampling(folder):
    store = FolderFeatureStore(folder, num_frames=10, feature_dim=D)
    assert store.video_ids() == ["vid_a", "vid_b", "vid_c", "vid_d"]
    for video_id in store.video_ids():
        out = store.load(video_id)
        assert out.shape == (10, D) and out.dtype == np.float32
    np.testing.assert_array_equal(store.load("vid_a"), features(10, 1).astype(np.float32))
    np.testing.assert_array_equal(store.load("vid_b")[[0, -1]], features(20, 3)[[0, -1]].astype(np.float32))
    np.testing.assert_array_equal(store.load("vid_d")[:2], features(5, 5)[[0, 0]].astype(np.float32))


BAD_FILES = {
    "missing": ("gone.npy", None, "missing"),
    "wrong_dim": ("wrong_dim.npy", np.zeros((5, D + 1), np.float16), "bad shape"),
    "one_d": ("one_d.npy", np.zeros(D, np.float16), "bad shape"),
    "zero_frames": ("zero_frames.npy", np.zeros((0, D), np.float16), "empty"),
    "nan": ("nan.npy", np.full((3, D), np.nan, np.float16), "non-finite"),
    "inf": ("inf.npz", np.full((3, D), np.inf, np.float32), "non-finite"),
    # before: finite as float64, so loaded; inf once cast to float32
    "beyond_float32": ("huge.npy", np.full((3, D), 1e39), "non-finite: 24 NaN/inf values, 24 of them beyond"),
    "corrupt": ("corrupt.npy", b"\x93NUMPY garbage", "unreadable"),
    "empty_npz": ("empty_npz.npz", "empty archive", "unreadable"),
    # before: the first array (clip) was read
    "several_arrays": (
        "several.npz",
        {"clip": np.zeros((3, D)), "slowfast": np.zeros((3, D))},
        r"unreadable: ValueError: several arrays \(clip, slowfast\) and none named features",
    ),
    "not_tensor": ("not_tensor.pt", {"x": 1}, "unreadable"),
    # before: complex features were read with a ComplexWarning, their imaginary part dropped
    "complex": ("complex.npy", np.full((3, D), 1j, np.complex64), "bad shape: dtype complex64 is not real"),
    "complex_pt": ("complex_pt.pt", torch.full((3, D), 1j), "bad shape: dtype complex64 is not real"),
    "bool": ("bool.npz", np.ones((3, D), bool), "bad shape: dtype bool is not real"),
    # before: "This file contains pickled (object) data"
    "text": ("text.npy", b"video features\n", "unreadable: ValueError: not a .npy file"),
}


def write_bad(root: Path, name: str, content: object) -> None:
    path = root / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        np.savez(path)  # an archive with no array
    elif path.suffix == ".pt":
        torch.save(content, path)
    elif isinstance(content, dict):
        np.savez(path, **content)
    elif path.suffix == ".npz":
        np.savez(path, features=content)
    elif content is not None:
        np.save(path, content)


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_folder_store_bad_files_raise_feature_error(tmp_path, case):
    name, content, kind = BAD_FILES[case]
    write_bad(tmp_path, name, content)
    video_id = name.split(".")[0]
    with pytest.raises(FeatureError, match=kind) as info:
        FolderFeatureStore(tmp_path, num_frames=4, feature_dim=D).load(video_id)
    assert info.value.video_id == video_id and video_id in str(info.value)
    assert str(tmp_path / (name if case != "missing" else f"{video_id}.npy")) in str(info.value)


def test_folder_store_refuses_two_files_of_one_video(tmp_path):
    """Before: the .npy was read and the .pt beside it (newer features, perhaps) silently ignored."""
    np.save(tmp_path / "v.npy", np.zeros((4, D), dtype=np.float32))
    torch.save(torch.ones(4, D), tmp_path / "v.pt")
    with pytest.raises(FeatureError, match=r"ambiguous: v\.npy, v\.pt; keep one"):
        FolderFeatureStore(tmp_path, num_frames=4, feature_dim=D).load("v")
    np.save(tmp_path / "w.npy", np.zeros((4, D), dtype=np.float32))
    (tmp_path / "w.NPY").write_bytes((tmp_path / "w.npy").read_bytes())  # case-sensitive file systems
    with pytest.raises(FeatureError, match=r"ambiguous: w\.npy, w\.NPY; keep one"):
        FolderFeatureStore(tmp_path, num_frames=4, feature_dim=D).load("w")


def test_a_video_id_too_long_for_a_file_name_is_a_feature_error(tmp_path):
    """Before: an OSError traceback (exit 1) from the coverage check, which strict=false could not skip."""
    np.save(tmp_path / "v.npy", np.zeros((4, D), dtype=np.float32))
    store, long_id = FolderFeatureStore(tmp_path, num_frames=4, feature_dim=D), "x" * 300
    with pytest.raises(FeatureError, match=f"^features of video '{long_id}' .*: not a file name here"):
        store.load(long_id)
    records = [
        GroundingRecord(f"q{i}", video, "a query", 9.0, 1.0, 2.0) for i, video in enumerate(["v", long_id])
    ]
    usable, report = check_coverage(records, store)
    assert [r.video_id for r in usable] == ["v"] and report.skipped_by_reason == {"not a file name here": 1}


def test_upper_case_suffixes_and_broken_links_are_listed(folder, tmp_path):
    """Before: vid_e.NPY and a link to nowhere were never listed, so packing left them out uncounted."""
    np.save(folder / "vid_e.npy", features(4, 6))
    (folder / "vid_e.npy").rename(folder / "vid_e.NPY")
    (folder / "vid_f.npz").symlink_to(tmp_path / "nowhere.npz")
    store = FolderFeatureStore(folder, num_frames=4, feature_dim=D)
    assert store.video_ids() == ["vid_a", "vid_b", "vid_c", "vid_d", "vid_e", "vid_f"]
    np.testing.assert_array_equal(store.load("vid_e"), features(4, 6).astype(np.float32))
    with pytest.raises(FeatureError, match=rf"{folder / 'vid_f.npz'}.*unreadable"):
        store.load("vid_f")
    report = pack_folder(folder, tmp_path / "packed", num_frames=4, feature_dim=D)
    assert "vid_e" in report.packed and list(report.bad) == ["vid_f"]


@pytest.mark.filterwarnings("error::RuntimeWarning")  # before (review): numpy's overflow warning came first
def test_features_beyond_the_packed_dtype_are_left_out(folder, tmp_path):
    """Before: 1e5 became inf in float16; the store packed it, reported no bad file, and failed to load."""
    np.save(folder / "vid_big.npy", np.full((4, D), 1e5, np.float32))
    report = pack_folder(folder, tmp_path / "packed", num_frames=4, feature_dim=D)
    assert list(report.bad) == ["vid_big"] and "vid_big" not in report.packed
    assert report.bad["vid_big"].endswith("beyond float16's range (largest |value| 1e+05 > 65504)")
    wide = pack_folder(folder, tmp_path / "packed32", num_frames=4, feature_dim=D, dtype="float32")
    assert "vid_big" in wide.packed and not wide.bad


def test_pack_round_trip_equals_folder_store(folder, tmp_path):
    write_bad(folder, "broken.npy", np.full((3, D), np.nan, np.float16))
    start_method = multiprocessing.get_start_method()
    report = pack_folder(folder, tmp_path / "packed", num_frames=10, feature_dim=D, dtype="float32")
    assert multiprocessing.get_start_method() == start_method  # litdata forces spawn
    assert report.packed == ["vid_a", "vid_b", "vid_c", "vid_d"] and list(report.bad) == ["broken"]
    assert "non-finite" in report.bad["broken"]
    packed = PackedFeatureStore(tmp_path / "packed", feature_dim=D)
    folder_store = FolderFeatureStore(folder, num_frames=10, feature_dim=D)
    assert (packed.num_frames, packed.feature_dim) == (10, D)
    for video_id in report.packed:
        np.testing.assert_array_equal(packed.load(video_id), folder_store.load(video_id))
    with pytest.raises(FeatureError, match="missing") as info:
        packed.load("broken")
    assert str(tmp_path / "packed") in str(info.value)
    clone = pickle.loads(pickle.dumps(packed))  # as sent to DataLoader workers
    np.testing.assert_array_equal(clone.load("vid_c"), folder_store.load("vid_c"))
    assert PackedFeatureStore(tmp_path / "packed", num_frames=5).load("vid_a").shape == (5, D)
    # a user mistake that train.py reports in one line naming the key (was a ValueError traceback)
    with pytest.raises(StoreMismatchError, match=rf"data.source.feature_dim={D + 1}: .* holds 8-d features"):
        PackedFeatureStore(tmp_path / "packed", feature_dim=D + 1)
    assert StoreMismatchError in INPUT_ERRORS
    with pytest.raises(FileExistsError):
        pack_folder(folder, tmp_path / "packed", num_frames=10, feature_dim=D)
    for chunk in (tmp_path / "packed").glob("chunk-*.bin"):
        chunk.write_bytes(chunk.read_bytes()[:100])
    with pytest.raises(FeatureError, match=r"'vid_d'.*unreadable"):
        PackedFeatureStore(tmp_path / "packed").load("vid_d")
    (chunk,) = (tmp_path / "packed").glob("chunk-*.bin")
    chunk.unlink()  # before: each video waited 2 s for a "download" and failed as a timeout
    with pytest.raises(StoreIndexError, match=rf"^{chunk}: missing, though .*index.json lists it"):
        PackedFeatureStore(tmp_path / "packed")


def test_pack_cli_float16(folder, tmp_path, capsys):
    assert pack_main([str(folder), str(tmp_path / "p16"), "--num-frames", "6", "--feature-dim", str(D)]) == 0
    assert "packed 4 videos, 0 bad" in capsys.readouterr().out
    meta = json.loads((tmp_path / "p16" / "timerefine_features.json").read_text())
    assert meta["dtype"] == "float16" and sorted(meta["index"]) == ["vid_a", "vid_b", "vid_c", "vid_d"]
    out = PackedFeatureStore(tmp_path / "p16").load("vid_b")
    assert out.dtype == np.float32 and out.shape == (6, D)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no source", "no such folder of feature files"),  # each was a traceback, exit 1
        ("destination is a file", "exists and is not a directory; pack into a new folder"),
        ("destination below a file", "is a file, so no directory can be made below it; pack into a new"),
        ("destination not empty", "is not empty; pack into a new folder"),
        ("no usable file", "no usable feature file in"),
        ("destination that cannot be made", "/sys/packed: cannot be made|/sys is not writable here"),
    ],
)
def test_pack_cli_mistakes_are_one_line(folder, tmp_path, capsys, case, message):
    src, dst, dim = folder, tmp_path / "packed", str(D)
    if case == "no source":
        src = tmp_path / "nowhere"
    elif case == "destination is a file":
        dst.write_text("keep me\n")
    elif case == "destination below a file":
        dst.write_text("keep me\n")
        dst = dst / "sub"
    elif case == "destination not empty":
        dst.mkdir()
        (dst / "mine.txt").write_text("keep me\n")
    elif case == "destination that cannot be made":  # before (review): the packing child's traceback
        dst = Path("/sys/packed")  # root may not make it either
    else:
        dim = str(D + 1)
    assert pack_main([str(src), str(dst), "--num-frames", "6", "--feature-dim", dim]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: ") and re.search(message, lines[-1]), lines


@pytest.mark.parametrize("option", ["--num-frames", "--feature-dim", "--workers"])
def test_pack_cli_counts_are_at_least_one(folder, tmp_path, capsys, option):
    """Before: --num-frames 0 wrote a store of empty videos."""
    with pytest.raises(SystemExit) as exit_:
        pack_main([str(folder), str(tmp_path / "packed"), option, "0"])
    assert exit_.value.code == 2 and "must be an integer >= 1, got '0'" in capsys.readouterr().err
    assert not (tmp_path / "packed").exists()


def record(qid: str, video_id: str, query: str, start: float, end: float, duration: float = 10.0):
    return GroundingRecord(qid, video_id, query, duration, start, end)


RECORDS = [
    record("q0", "v1", "A person opens the door.", 2.0, 4.0),
    record("q1", "v1", "person sits on a chair", 7.0, 9.0),
    record("q2", "v2", "Someone opens a door", 0.0, 1.0, duration=5.0),
    record("q3", "v3", "the.", 0.0, 0.01),
]


def test_synthetic_store_is_deterministic_and_grounded():
    store = SyntheticFeatureStore(RECORDS, num_frames=20, feature_dim=64, seed=3, noise=0.1)
    v1 = store.load("v1")
    assert v1.shape == (20, 64) and v1.dtype == np.float32
    np.testing.assert_array_equal(v1, SyntheticFeatureStore(RECORDS, 20, 64, seed=3, noise=0.1).load("v1"))
    assert not np.array_equal(v1, SyntheticFeatureStore(RECORDS, 20, 64, seed=4, noise=0.1).load("v1"))
    opens = query_signature("opens door", 3, 64)
    scores = v1 @ opens  # frame k shows time 10 k / 19 seconds: 2.1 to 3.7 s for k = 4..7
    inside = np.zeros(20, bool)
    inside[4:8] = True
    assert scores[inside].min() > 0.7 and np.abs(scores[~inside]).max() < 0.5
    # the same words ground the same way in another video
    v2_scores = store.load("v2") @ opens
    assert v2_scores[:4].min() > 0.7 and np.abs(v2_scores[4:]).max() < 0.5
    v1[:] = 0  # callers cannot corrupt the cache
    assert store.load("v1").any()
    assert stable_seed("word", 3, "door") == 14403303340753390923  # pinned: same in every process


def test_synthetic_store_unknown_video_and_cache_bound():
    store = SyntheticFeatureStore(RECORDS, num_frames=4, feature_dim=8, cache_size=1)
    with pytest.raises(FeatureError, match=r"'nope'.*missing"):
        store.load("nope")
    store.load("v1"), store.load("v2")
    assert list(store._cache) == ["v2"]
    assert store.load("v3").shape == (4, 8)  # no content word: noise only


def test_build_feature_store(folder):
    assert isinstance(build_feature_store("folder", root=folder, feature_dim=D), FolderFeatureStore)
    assert isinstance(build_feature_store("synthetic", records=RECORDS), SyntheticFeatureStore)
    with pytest.raises(ValueError, match=r"unknown feature store kind 'lmdb'.*folder.*packed.*synthetic"):
        build_feature_store("lmdb")


def test_coverage_strict_and_lenient(folder):
    write_bad(folder, "vid_nan.npy", np.full((3, D), np.nan, np.float16))
    records = [
        record("a0", "vid_a", "x", 0, 1),
        record("a1", "vid_a", "y", 0, 1),
        record("n0", "vid_nan", "x", 0, 1),
        record("m0", "vid_missing", "x", 0, 1),
        record("m1", "vid_missing", "y", 0, 1),
        record("b0", "vid_b", "x", 0, 1),
    ]
    store = FolderFeatureStore(folder, num_frames=4, feature_dim=D)
    usable, report = check_coverage(records, store)
    assert [r.qid for r in usable] == ["a0", "a1", "b0"]
    assert (report.total, report.usable) == (6, 3)
    assert report.skipped_by_reason == {"non-finite": 1, "missing": 2}
    assert "3/6 queries (50.0%)" in report.summary() and "vid_missing" in report.summary()
    with pytest.raises(FeatureError, match=r"vid_nan.*vid_nan\.npy.*non-finite"):
        check_coverage(records, store, strict=True)
    assert check_coverage(records[:2], store, strict=True)[1].fraction == 1.0


CHARADES = Path(__file__).resolve().parents[2] / "shared" / "data" / "charades_sta"


@pytest.mark.real_data
@pytest.mark.skipif(
    not (CHARADES / "charades_sta_test.txt").is_file(), reason=f"real annotations absent: {CHARADES}"
)
def test_synthetic_features_cover_real_charades_test():
    from datamodules.charades_sta import load_charades_sta

    records, _ = load_charades_sta(CHARADES, "test")
    store = build_feature_store("synthetic", records=records, num_frames=100, feature_dim=768, seed=0)
    usable, report = check_coverage(records, store, strict=True)
    assert len(usable) == report.total == report.usable == 3720
    first = records[0]
    scores = store.load(first.video_id) @ query_signature(first.query, 0, 768)
    times = frame_times(100, first.duration)
    inside = (times >= first.start) & (times <= first.end)
    assert scores[inside].min() > 0.5 > np.abs(scores[~inside]).max()


STORE_KINDS = ("folder", "packed", "synthetic", "builtin")


def store_and_records(kind: str, folder: Path, tmp_path: Path) -> tuple[FeatureStore, list[GroundingRecord]]:
    """A store of each kind with one record per video it serves."""
    if kind == "builtin":
        spec = BuiltinSpec(num_train=4, num_frames=10, feature_dim=D)
        return BuiltinFeatureStore(spec, "train"), builtin_records(spec, "train")
    videos = FolderFeatureStore(folder).video_ids()
    records = [record(f"q{i}", video, "a person opens the door", 1.0, 3.0) for i, video in enumerate(videos)]
    if kind == "synthetic":
        return SyntheticFeatureStore(records, num_frames=10, feature_dim=D), records
    if kind == "packed":
        pack_folder(folder, tmp_path / "packed", num_frames=10, feature_dim=D, dtype="float32")
        return PackedFeatureStore(tmp_path / "packed", feature_dim=D), records
    return FolderFeatureStore(folder, num_frames=10, feature_dim=D), records


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("kind", STORE_KINDS)
def test_every_store_serves_the_dataset_through_a_dataloader(folder, tmp_path, kind, num_workers):
    store, records = store_and_records(kind, folder, tmp_path)
    dataset = GroundingDataset(records, store)
    keys = [(3, i) for i in range(len(records))]
    loader = DataLoader(dataset, batch_size=2, sampler=keys, collate_fn=list, num_workers=num_workers)
    items = [item for batch in loader for item in batch]
    assert [(item["epoch"], item["index"]) for item in items] == keys
    for item, expected in zip(items, records, strict=True):
        assert item["record"] == expected
        assert item["features"].dtype == torch.float32 and item["features"].shape == (10, D)
        np.testing.assert_array_equal(item["features"].numpy(), store.load(expected.video_id))
    assert dataset[0]["epoch"] == 0
    unknown = GroundingDataset([record("q", "builtin_train_999999", "x", 0, 1)], store)
    with pytest.raises(FeatureError, match=r"'builtin_train_999999'.*missing"):
        unknown[0]


def test_builtin_features_are_generated_once_up_to_the_cache_budget(monkeypatch):
    spec = BuiltinSpec(num_train=6, num_frames=10, feature_dim=D)
    monkeypatch.setattr(feature_stores, "GENERATED_CACHE_BYTES", 4 * 10 * D * 4)  # four videos' features
    store, generated = BuiltinFeatureStore(spec, "train"), []

    def counted(spec: BuiltinSpec, split: str, index: int) -> builtin.BuiltinSample:
        generated.append(index)
        return make_sample(spec, split, index)

    monkeypatch.setattr(builtin, "make_sample", counted)
    first = [store.load(f"builtin_train_{i:06d}") for i in range(6)]
    again = [store.load(f"builtin_train_{i:06d}") for i in range(6)]
    assert generated == [0, 1, 2, 3, 4, 5, 4, 5]  # the first four are kept, the rest made anew
    for i, (a, b) in enumerate(zip(first, again, strict=True)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, make_sample(spec, "train", i).features)
