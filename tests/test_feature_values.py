"""Features as the model reads them: values checked as float32 at setup, a store's broken contract
named by its file, and a packed store's damaged record."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from datamodules.coverage import check_coverage
from datamodules.dataset import GroundingDataset
from datamodules.feature_stores import PACKED_META, FolderFeatureStore, PackedFeatureStore, StoreIndexError
from grounding.records import FeatureError, GroundingRecord
from timerefine.pipeline.errors import INPUT_ERRORS

D = 8


def record(qid: str, video_id: str) -> GroundingRecord:
    return GroundingRecord(qid, video_id, "a person opens the door", 10.0, 0.0, 1.0)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    np.save(tmp_path / "vid_a.npy", np.ones((6, D), np.float16))
    np.save(tmp_path / "vid_huge.npy", np.concatenate([np.ones((3, D)), np.full((1, D), -1e39)]))
    return tmp_path


def test_values_beyond_float32_are_skipped_or_named_at_setup(folder):
    """Before: they passed setup (100% coverage) and stopped the run at its test, strict=false or not."""
    records = [record("a0", "vid_a"), record("h0", "vid_huge")]
    store = FolderFeatureStore(folder, num_frames=4, feature_dim=D)
    usable, report = check_coverage(records, store)
    assert [r.qid for r in usable] == ["a0"] and report.skipped_by_reason == {"non-finite": 1}
    with pytest.raises(FeatureError, match=rf"{folder / 'vid_huge.npy'}\): non-finite: 8 NaN/inf values"):
        check_coverage(records, store, strict=True)


def test_features_a_store_should_have_refused_are_named_by_their_file(folder, monkeypatch):
    """Before: the error named the store class (FolderFeatureStore), and a float64 1e39 passed its
    finite check to become inf at the cast to float32."""
    store = FolderFeatureStore(folder, num_frames=10, feature_dim=D)
    monkeypatch.setattr(store, "load", lambda video_id: np.full((10, D), 1e39))
    dataset = GroundingDataset([record("q", "vid_a")], store)
    with pytest.raises(FeatureError, match=rf"\({folder / 'vid_a.npy'}\): features contain NaN or inf"):
        dataset[0]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"num_frames": 10, "feature_dim": 8, "ind', "not JSON"),
        ('{"num_frames": 10, "feature_dim": 8}', "index missing or malformed"),
        ('{"num_frames": "10", "index": {"v": 0}}', "num_frames, feature_dim missing or malformed"),
        ("[]", "not a packed store record"),
    ],
)
def test_a_damaged_packed_store_record_is_one_error_naming_it(tmp_path, text, message):
    """Before: a JSONDecodeError, KeyError or TypeError traceback."""
    (tmp_path / PACKED_META).write_text(text)
    with pytest.raises(StoreIndexError, match=f"^{re.escape(str(tmp_path / PACKED_META))}: {message}"):
        PackedFeatureStore(tmp_path)
    assert StoreIndexError in INPUT_ERRORS
