"""A data.source.feature_path that is no packed store says what it is instead, and the fix."""

from __future__ import annotations

import numpy as np
import pytest

from datamodules.feature_stores import PackedFeatureStore, StoreMismatchError


def test_packed_store_rejects_plain_folder(tmp_path):
    """Review: a folder read as packed named neither the key nor the fix, as the reverse mistake does;
    then an unfinished pack, an empty folder and a file were all told to set features=folder."""
    folder, unfinished, chunks, empty = (
        tmp_path / name for name in ("feats", "unfinished", "chunks", "empty")
    )
    for made in (folder, unfinished, chunks, empty):
        made.mkdir()
    np.save(folder / "vid_a.npy", np.zeros((4, 8), np.float16))
    (unfinished / "index.json").write_text("{}")  # litdata's, written before the metadata
    (chunks / "chunk-0-0.bin").write_bytes(b"")  # review: stopped before litdata's index
    with pytest.raises(
        StoreMismatchError, match=f"feature_path={folder}: .*; set data.source.features=folder"
    ):
        PackedFeatureStore(folder)
    with pytest.raises(FileNotFoundError, match=r"feature_path=.*: no such packed feature store"):
        PackedFeatureStore(tmp_path / "absent")
    for path, named in (
        (unfinished, "an unfinished pack"),
        (chunks, "an unfinished pack"),
        (empty, "no timerefine_features.json .not made by"),
        (folder / "vid_a.npy", "a file, not"),
    ):
        with pytest.raises(StoreMismatchError, match=f"feature_path={path}: {named}"):
            PackedFeatureStore(path)
