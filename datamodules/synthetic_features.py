"""Synthetic frame features for real annotations, so the pipeline runs with no video download.

Each query leaves a signature (the normalised sum of per-word random unit vectors) on the
frames inside each of its ground-truth windows, on top of Gaussian noise everywhere. Word vectors are
shared across videos, so a model can learn to ground words; everything is deterministic from
``(seed, video_id)``. This validates plumbing and learning, not video understanding.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict, defaultdict
from collections.abc import Iterable
from functools import lru_cache

import numpy as np

from grounding.answer_format.prompts import normalize_query
from grounding.answer_format.timeline import frame_times
from grounding.records import FeatureError, GroundingRecord

_STOPWORD_TEXT = (
    "a an the and or of to in on at with from into onto by for is are was were be been being it its "
    "this that their his her he she they them then while as person someone people"
)
STOPWORDS = frozenset(_STOPWORD_TEXT.split())


def stable_seed(*parts: object) -> int:
    """A 64-bit seed from the parts' text (blake2b, stable across processes unlike ``hash``)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def content_words(query: str) -> list[str]:
    """The normalised query's words without stopwords."""
    return [w for w in re.findall(r"[a-z0-9']+", normalize_query(query)) if w not in STOPWORDS]


@lru_cache(maxsize=16384)
def word_vector(word: str, seed: int, dim: int) -> np.ndarray:
    """A deterministic random unit vector for ``word``."""
    vector = np.random.default_rng(stable_seed("word", seed, word)).standard_normal(dim)
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def query_signature(query: str, seed: int, dim: int) -> np.ndarray | None:
    """Unit-norm sum of the content words' vectors; None when the query has no content word."""
    words = content_words(query)
    if not words:
        return None
    signature = np.sum([word_vector(w, seed, dim) for w in words], axis=0)
    return signature / max(float(np.linalg.norm(signature)), 1e-12)


class SyntheticFeatureStore:
    """Features synthesized from ``records``; frame k shows ``k / (num_frames - 1)`` of the video
    (``frame_times``, as every timeline places frames).

    ``noise`` is the expected norm of each frame's noise vector (signatures have norm 1).
    """

    def __init__(
        self,
        records: Iterable[GroundingRecord],
        num_frames: int = 100,
        feature_dim: int = 768,
        seed: int = 0,
        noise: float = 0.5,
        cache_size: int = 1024,
    ) -> None:
        self.num_frames, self.feature_dim, self.seed, self.noise = num_frames, feature_dim, seed, noise
        self.by_video: dict[str, list[GroundingRecord]] = defaultdict(list)
        for record in records:
            self.by_video[record.video_id].append(record)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def load(self, video_id: str) -> np.ndarray:
        if video_id in self._cache:
            self._cache.move_to_end(video_id)
            return self._cache[video_id].copy()
        features = self._synthesize(video_id)
        self._cache[video_id] = features
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return features.copy()

    def source(self, video_id: str) -> str:
        return f"synthetic:seed={self.seed}"

    def _synthesize(self, video_id: str) -> np.ndarray:
        records = self.by_video.get(video_id)
        if not records:
            raise FeatureError(video_id, self.source(video_id), "missing: no annotation for this video")
        rng = np.random.default_rng(stable_seed("video", self.seed, video_id))
        shape = (self.num_frames, self.feature_dim)
        features = rng.standard_normal(shape) * (self.noise / np.sqrt(self.feature_dim))
        times = frame_times(self.num_frames, records[0].duration)
        for record in records:
            signature = query_signature(record.query, self.seed, self.feature_dim)
            if signature is None:
                continue
            inside = np.zeros(self.num_frames, dtype=bool)
            for start, end in record.windows:
                window = (times >= start) & (times <= end)
                if not window.any():  # a segment shorter than a frame still marks its nearest frame
                    window[np.abs(times - (start + end) / 2).argmin()] = True
                inside |= window
            features[inside] += signature
        return features.astype(np.float32)
