"""Feature stores: per-video files in a folder, a packed litdata dataset, and synthetic features.

Every store returns float32 ``(num_frames, feature_dim)`` arrays and raises :class:`FeatureError`
(naming the video and the file) for anything missing or malformed. Reasons start with a short
kind (``missing``, ``unreadable``, ``bad shape``, ``empty``, ``non-finite``) used to group them.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from datamodules.synthetic_features import SyntheticFeatureStore
from grounding.records import FeatureError, FeatureStore, resample_frames

SUFFIXES = (".npy", ".npz", ".pt")
NPY_MAGIC = b"\x93NUMPY"
SPELLINGS = (*SUFFIXES, *(suffix.upper() for suffix in SUFFIXES))  # as a folder's names may write them


PACKED_META = "timerefine_features.json"
# What a store that generates its features (built-in videos, action traces) keeps, so later epochs do
# not generate them again: the default's 4,000 videos take 100 MB, Charades-STA's 6,672 action traces
# at 256 dimensions 667 MB. Videos past it are generated at every load.
GENERATED_CACHE_BYTES = 2**30


class GeneratedFeatures:
    """``make(video_id)``'s arrays, each made once and kept up to :data:`GENERATED_CACHE_BYTES`. The
    first ones made stay: a shuffled epoch reads every video alike, so evicting would gain nothing."""

    def __init__(self, make: Callable[[str], np.ndarray]) -> None:
        self.make = make
        self.kept: dict[str, np.ndarray] = {}
        self.free = GENERATED_CACHE_BYTES

    def load(self, video_id: str) -> np.ndarray:
        if (features := self.kept.get(video_id)) is None:
            features = self.make(video_id)
            if features.nbytes <= self.free:
                self.kept[video_id], self.free = features, self.free - features.nbytes
        return features


def reason_kind(error: FeatureError) -> str:
    """The short kind that starts a store's reason, e.g. ``missing`` or ``non-finite``."""
    return error.reason.split(":", 1)[0]


def check_features(array: Any, video_id: str, path: str | Path, feature_dim: int) -> np.ndarray:
    """Validate a ``(T, feature_dim)`` array of real numbers (integers or floats: not complex, bool, ...)
    with T > 0 and values finite as float32 (a float64 1e39 is not); return it as a float32 copy."""
    array = np.asarray(array)
    if array.ndim != 2 or array.shape[1] != feature_dim:
        raise FeatureError(video_id, str(path), f"bad shape: expected (T, {feature_dim}), got {array.shape}")
    if array.dtype.kind not in "iuf":
        raise FeatureError(video_id, str(path), f"bad shape: dtype {array.dtype} is not real numbers")
    if array.shape[0] == 0:
        raise FeatureError(video_id, str(path), "empty: zero frames")
    with np.errstate(over="ignore"):  # values beyond float32's range become inf: counted below
        values = array.astype(np.float32)
    if bad := int(np.size(values) - np.count_nonzero(np.isfinite(values))):
        beyond = bad - int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        why = f", {beyond} of them beyond float32's range" if beyond else ""
        raise FeatureError(video_id, str(path), f"non-finite: {bad} NaN/inf values{why}")
    return values


def read_feature_file(path: Path) -> np.ndarray:
    """Read one ``.npy`` / ``.npz`` (key ``features``, or its only array) / ``.pt`` (tensor) file."""
    suffix = path.suffix.lower()  # FEATURES.NPY too
    if suffix == ".npy":
        with open(path, "rb") as file:
            if file.read(len(NPY_MAGIC)) != NPY_MAGIC:  # NumPy reads anything else as pickled data
                raise ValueError("not a .npy file (it does not start with the NumPy header)")
        return np.load(path, allow_pickle=False)
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            if not archive.files:
                raise ValueError("the .npz archive holds no array")
            if "features" in archive.files:
                return archive["features"]
            if len(archive.files) > 1:  # which one is meant cannot be told
                raise ValueError(f"several arrays ({', '.join(archive.files)}) and none named features")
            return archive[archive.files[0]]
    import torch

    tensor = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"expected a tensor, got {type(tensor).__name__}")
    return tensor_array(tensor)


def tensor_array(tensor: Any) -> np.ndarray:
    """A torch tensor as a numpy array of its own dtype (bfloat16, which numpy lacks, as float32)."""
    import torch

    tensor = tensor.detach().cpu()
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


def read_error(error: Exception) -> str:
    """Why a feature file could not be read, in one line (torch's unpickling errors run to ten)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _same(a: Path, b: Path) -> bool:
    """Whether two names are one file (``x.npy`` and ``x.NPY`` on a case-insensitive file system)."""
    return a.exists() and b.exists() and os.path.samefile(a, b)


class StoreMismatchError(ValueError):
    """A feature store that holds other features than the config asks for; the message names the key."""


class FolderFeatureStore:
    """``root/{video_id}.npy`` (or ``.npz`` / ``.pt``) with any ``(T, D)``, resampled to ``num_frames``."""

    def __init__(self, root: str | Path, num_frames: int = 100, feature_dim: int = 768) -> None:
        """StoreMismatchError naming ``data.source.feature_path`` when ``root`` is no folder or a
        packed store (each video's file would be reported missing)."""
        self.root, self.num_frames, self.feature_dim = Path(root), num_frames, feature_dim
        self._paths: dict[str, Path] = {}  # video id -> its file, once found
        key = f"data.source.feature_path={root}"
        if not self.root.is_dir():
            here = "" if self.root.is_absolute() else f", relative to {Path.cwd()}"
            what = "a file, not a folder" if self.root.exists() else "no such folder"
            raise StoreMismatchError(f"{key}: {what} of feature files{here}")
        if (self.root / PACKED_META).is_file():
            raise StoreMismatchError(f"{key}: a packed feature store; set data.source.features=packed")

    def video_ids(self) -> list[str]:
        """Sorted ids of the videos that have a feature file, its suffix in lower or upper case (a link
        to nowhere too: loading it says so)."""
        return sorted({p.stem for p in self.root.iterdir() if p.suffix in SPELLINGS and not p.is_dir()})

    def path(self, video_id: str) -> Path:
        """The one file holding ``video_id`` (``.npy`` or ``.NPY``, ...), looked up once (the ``.npy``
        name when there is none); two files of one video are a FeatureError, as which one is meant
        cannot be told."""
        if video_id not in self._paths:
            named = [self.root / f"{video_id}{suffix}" for suffix in SPELLINGS]
            try:
                found = [p for p in named if p.is_file() or p.is_symlink()]
            except OSError as err:  # a name too long for the file system
                raise FeatureError(video_id, str(named[0]), f"not a file name here: {err.strerror}") from err
            found = [p for i, p in enumerate(found) if not any(_same(p, q) for q in found[:i])]
            if len(found) > 1:
                names = ", ".join(p.name for p in found)
                raise FeatureError(video_id, str(found[0]), f"ambiguous: {names}; keep one")
            if not found:
                return self.root / f"{video_id}{SUFFIXES[0]}"
            self._paths[video_id] = found[0]
        return self._paths[video_id]

    def source(self, video_id: str) -> str:
        return str(self.path(video_id))

    def load(self, video_id: str) -> np.ndarray:
        path = self.path(video_id)
        if not path.is_file() and not path.is_symlink():
            raise FeatureError(video_id, str(path), f"missing: no {'/'.join(SUFFIXES)} file in {self.root}")
        try:
            array = read_feature_file(path)
        except Exception as err:
            raise FeatureError(video_id, str(path), f"unreadable: {read_error(err)}") from err
        array = check_features(array, video_id, path, self.feature_dim)
        return resample_frames(array, self.num_frames)


class StoreIndexError(ValueError):
    """A packed store whose record (``timerefine_features.json``) is damaged; the message names it."""


def _count(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def read_packed_meta(path: Path) -> dict[str, Any]:
    """A packed store's record: ``num_frames`` and ``feature_dim`` (>= 1) and ``index`` (video id to
    item number); StoreIndexError naming the file when it is not JSON or lacks one of them."""
    try:
        meta = json.loads(path.read_text())
    except ValueError as err:  # not JSON (a truncated file), not UTF-8
        raise StoreIndexError(f"{path}: not JSON ({err}); pack the features again") from err
    if not isinstance(meta, dict):
        raise StoreIndexError(f"{path}: not a packed store record (a JSON object); pack the features again")
    wrong = [key for key in ("num_frames", "feature_dim") if not _count(meta.get(key), 1)]
    index = meta.get("index")
    if not isinstance(index, dict) or not all(_count(item, 0) for item in index.values()):
        wrong.append("index")
    if wrong:
        raise StoreIndexError(f"{path}: {', '.join(wrong)} missing or malformed; pack the features again")
    return meta


def check_chunks(store: Path) -> None:
    """StoreIndexError naming the first chunk file that litdata's ``index.json`` lists but ``store``
    lacks (litdata would wait for it as for a download, then time out), or the index itself."""
    index = store / "index.json"
    try:
        chunks = [chunk["filename"] for chunk in json.loads(index.read_text())["chunks"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise StoreIndexError(
            f"{index}: not litdata's index of chunks ({err}); pack the features again"
        ) from err
    if missing := [name for name in chunks if not (store / name).is_file()]:
        raise StoreIndexError(
            f"{store / missing[0]}: missing, though {index} lists it; pack the features again"
        )


def not_packed(path: Path) -> NoReturn:
    """The error for ``path``, which holds no packed store's metadata: what it is instead, and the fix."""
    key = f"data.source.feature_path={path}"
    if not path.exists():
        raise FileNotFoundError(f"{key}: no such packed feature store ({path / PACKED_META} not found)")
    if not path.is_dir():
        raise StoreMismatchError(f"{key}: a file, not a packed feature store (a folder)")
    if (path / "index.json").is_file() or any(path.glob("chunk-*.bin")):  # litdata's; the metadata comes last
        raise StoreMismatchError(f"{key}: an unfinished pack (no {PACKED_META}); pack the features again")
    if any(child.suffix in SPELLINGS for child in path.iterdir()):
        raise StoreMismatchError(f"{key}: a folder of feature files; set data.source.features=folder")
    raise StoreMismatchError(f"{key}: no {PACKED_META} (not made by timerefine-pack-features)")


class PackedFeatureStore:
    """A litdata-optimized folder (see ``timerefine/tools/pack_features.py``), read by video id.

    ``num_frames`` defaults to the packed length (other values resample); ``feature_dim``, when
    given, must match the packed one.
    """

    def __init__(
        self, path: str | Path, num_frames: int | None = None, feature_dim: int | None = None
    ) -> None:
        self.path = Path(path)
        meta_path = self.path / PACKED_META
        if not meta_path.is_file():
            not_packed(self.path)
        meta = read_packed_meta(meta_path)
        check_chunks(self.path)
        if feature_dim is not None and feature_dim != meta["feature_dim"]:
            raise StoreMismatchError(
                f"data.source.feature_dim={feature_dim}: {self.path} holds {meta['feature_dim']}-d features"
            )
        self.feature_dim = meta["feature_dim"]
        self.num_frames = num_frames or meta["num_frames"]
        self.index: dict[str, int] = meta["index"]
        self._dataset: Any = None

    def source(self, video_id: str) -> str:
        return str(self.path)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_dataset": None}  # each DataLoader worker opens its own reader

    def load(self, video_id: str) -> np.ndarray:
        if video_id not in self.index:
            raise FeatureError(video_id, str(self.path), "missing: video not in the packed store")
        try:
            if self._dataset is None:
                self._dataset = _open_streaming_dataset(self.path)
            item = self._dataset[self.index[video_id]]
        except Exception as err:
            raise FeatureError(video_id, str(self.path), f"unreadable: {read_error(err)}") from err
        if item["video_id"] != video_id:
            raise FeatureError(video_id, str(self.path), f"unreadable: index points at {item['video_id']!r}")
        array = check_features(item["features"], video_id, self.path, self.feature_dim)
        return resample_frames(array, self.num_frames)


def _open_streaming_dataset(path: Path) -> Any:
    from litdata import StreamingDataset

    # Random access by id: decode one item per read, not the window of neighbours that newer
    # litdata versions decode by default for sequential streaming (about 5x slower here).
    per_item = {"batch_decode": 0} if "batch_decode" in inspect.signature(StreamingDataset).parameters else {}
    return StreamingDataset(str(path.resolve()), **per_item)


FEATURE_STORES: dict[str, type] = {
    "folder": FolderFeatureStore,
    "packed": PackedFeatureStore,
    "synthetic": SyntheticFeatureStore,
}


def build_feature_store(kind: str, **kwargs: Any) -> FeatureStore:
    """Build the store named ``kind`` (folder, packed or synthetic) from its keyword arguments."""
    if kind not in FEATURE_STORES:
        raise ValueError(f"unknown feature store kind {kind!r}; expected one of {sorted(FEATURE_STORES)}")
    return FEATURE_STORES[kind](**kwargs)
