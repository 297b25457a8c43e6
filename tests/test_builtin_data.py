"""The built-in procedural dataset (determinism, events, real signal, prior) and the sharded sampler."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from datamodules.builtin import OBJECTS, VERBS, BuiltinSpec, _vocabulary_vectors, builtin_records, make_sample
from datamodules.builtin_source import BuiltinSource
from datamodules.sampling import ShardedEpochSampler
from grounding.metrics.prior import prior_scores
from grounding.records import FeatureError
from tests import helpers

SPEC = BuiltinSpec(num_train=60, num_val=10, num_test=20, num_frames=50, feature_dim=32, seed=0)


def test_same_spec_same_data():
    for split in ("train", "val", "test"):
        for index in (0, 3):
            a, b = make_sample(SPEC, split, index), make_sample(SPEC, split, index)
            assert a.record == b.record
            assert np.array_equal(a.features, b.features)
    assert builtin_records(SPEC, "test") == builtin_records(dataclasses.replace(SPEC), "test")


def test_different_seed_or_split_different_data():
    other = dataclasses.replace(SPEC, seed=1)
    a, b = make_sample(SPEC, "train", 0), make_sample(other, "train", 0)
    assert not np.allclose(a.features, b.features)
    records, others = builtin_records(SPEC, "train"), builtin_records(other, "train")
    assert sum(r.query != o.query or r.start != o.start for r, o in zip(records, others, strict=True)) > 50
    assert make_sample(SPEC, "val", 0).record.duration != make_sample(SPEC, "test", 0).record.duration


def test_sizes_and_ids():
    source = BuiltinSource(SPEC)
    for split, size in (("train", 60), ("val", 10), ("test", 20)):
        records = source.records(split)
        assert len(records) == size
        assert len({r.qid for r in records}) == size and len({r.video_id for r in records}) == size
        features = source.store(split).load(records[-1].video_id)
        assert features.shape == (SPEC.num_frames, SPEC.feature_dim) and features.dtype == np.float32
        assert np.isfinite(features).all()
    assert source.num_frames == SPEC.num_frames and source.feature_dim == SPEC.feature_dim


def test_segments_lie_inside_the_video():
    for record in builtin_records(SPEC, "train"):
        assert SPEC.min_duration <= record.duration <= SPEC.max_duration
        assert 0 <= record.start < record.end <= record.duration
        length = (record.end - record.start) / record.duration
        assert SPEC.min_event_fraction - 0.02 <= length <= SPEC.max_event_fraction + 0.02


def test_two_to_four_events():
    # Without noise the features are (activation pattern) x (event signatures): their rank is the
    # number of events.
    clean = dataclasses.replace(SPEC, noise=0.0)
    ranks = [np.linalg.matrix_rank(make_sample(clean, "train", i).features, tol=1e-3) for i in range(60)]
    assert set(ranks) == {2, 3, 4}
    fixed = dataclasses.replace(clean, min_events=3, max_events=3)
    assert {np.linalg.matrix_rank(make_sample(fixed, "val", i).features, tol=1e-3) for i in range(10)} == {3}


def test_events_describe_the_video():
    for index in range(20):
        sample = make_sample(SPEC, "train", index)
        queried = sample.events[0]
        assert (queried.start, queried.end) == (sample.record.start, sample.record.end)
        assert query_event(sample.record.query) == (queried.verb, queried.obj)
        assert SPEC.min_events <= len(sample.events) <= SPEC.max_events
        assert len({(e.verb, e.obj) for e in sample.events}) == len(sample.events)


def test_a_video_is_queried_once_per_event_up_to_queries_per_video():
    spec = dataclasses.replace(SPEC, queries_per_video=3)
    records = builtin_records(spec, "train")
    expected = sum(min(len(make_sample(spec, "train", i).events), 3) for i in range(SPEC.num_train))
    assert len(records) == expected > SPEC.num_train
    assert len({r.qid for r in records}) == len(records)
    for index in range(10):
        sample = make_sample(spec, "train", index)
        assert len({r.video_id for r in sample.records}) == 1
        for record, event in zip(sample.records, sample.events, strict=False):
            assert (record.start, record.end) == (event.start, event.end)
            assert query_event(record.query) == (event.verb, event.obj)
        # The first query and the features do not depend on how many queries are asked.
        one = make_sample(SPEC, "train", index)
        assert sample.records[0] == one.records[0] and np.array_equal(sample.features, one.features)
    with pytest.raises(ValueError, match="queries_per_video=0"):
        dataclasses.replace(SPEC, queries_per_video=0)


def query_event(query: str) -> tuple[int, int]:
    """The (verb, object) a query names, read from its text."""
    verbs = [
        i
        for i, (third, prog, prep) in enumerate(VERBS)
        if f" {third}{prep} " in query or f" {prog}{prep} " in query
    ]
    objects = [i for i, name in enumerate(OBJECTS) if query.rstrip(".").endswith(f" {name}")]
    assert len(verbs) == 1 and len(objects) == 1, query
    return verbs[0], objects[0]


def test_the_query_signal_is_in_the_ground_truth_frames():
    verbs, objects = _vocabulary_vectors(SPEC)
    margins = []
    for index in range(40):
        sample = make_sample(SPEC, "train", index)
        record = sample.record
        verb, obj = query_event(record.query)
        signature = (verbs[verb] + objects[obj]) / 2
        score = sample.features @ signature / np.linalg.norm(signature) ** 2
        times = np.linspace(0, record.duration, SPEC.num_frames)
        inside = (times >= record.start) & (times <= record.end)
        assert inside.any() and (~inside).any()
        margins.append(score[inside].mean() - score[~inside].mean())
    margins = np.array(margins)
    assert (margins > 0.3).mean() >= 0.9
    assert margins.mean() > 0.6


def test_the_signal_disappears_without_signal():
    verbs, objects = _vocabulary_vectors(SPEC)
    flat = dataclasses.replace(SPEC, signal=0.0)
    margins = []
    for index in range(40):
        sample = make_sample(flat, "train", index)
        verb, obj = query_event(sample.record.query)
        signature = (verbs[verb] + objects[obj]) / 2
        score = sample.features @ signature / np.linalg.norm(signature) ** 2
        times = np.linspace(0, sample.record.duration, SPEC.num_frames)
        inside = (times >= sample.record.start) & (times <= sample.record.end)
        margins.append(score[inside].mean() - score[~inside].mean())
    assert abs(np.mean(margins)) < 0.1


def test_prior_scores_are_sane():
    spec = dataclasses.replace(SPEC, num_train=200, num_test=100)
    scores = prior_scores(builtin_records(spec, "train"), builtin_records(spec, "test"))
    assert 0 < scores["mIoU"] < 60
    assert 0 <= scores["R1@0.7"] <= scores["R1@0.5"] <= scores["R1@0.3"] <= 100


def test_dataset_items_and_feature_checks():
    data = helpers.dataset("val")
    item = data[(3, 2)]
    assert (item["epoch"], item["index"]) == (3, 2)
    assert item["record"] == data.records[2]
    assert data[2]["epoch"] == 0
    assert tuple(item["features"].shape) == (helpers.SPEC.num_frames, helpers.SPEC.feature_dim)

    class Broken:
        num_frames, feature_dim = helpers.SPEC.num_frames, helpers.SPEC.feature_dim

        def __init__(self, array):
            self.array = array

        def load(self, video_id):
            return self.array

        def source(self, video_id):
            return "broken"

    from datamodules.dataset import GroundingDataset

    bad_shape = GroundingDataset(data.records, Broken(np.zeros((3, 3), dtype=np.float32)))
    with pytest.raises(FeatureError, match="shape"):
        bad_shape[0]
    nan = np.zeros((Broken.num_frames, Broken.feature_dim), dtype=np.float32)
    nan[1, 1] = np.nan
    with pytest.raises(FeatureError, match="NaN"):
        GroundingDataset(data.records, Broken(nan))[0]


# ---- sampler -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "world"), [(10, 3), (7, 4), (5, 8), (12, 1), (100, 6)])
@pytest.mark.parametrize("shuffle", [False, True])
def test_shards_are_disjoint_and_cover_everything(size, world, shuffle):
    shards = []
    for rank in range(world):
        sampler = ShardedEpochSampler(size, shuffle, seed=4, rank=rank, world_size=world)
        sampler.set_epoch(2)
        drawn = list(sampler)
        assert len(drawn) == len(sampler)
        assert all(epoch == 2 for epoch, _ in drawn)
        shards.append([index for _, index in drawn])
    everything = [index for shard in shards for index in shard]
    assert sorted(everything) == list(range(size))  # each index exactly once, no padding
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.parametrize(("size", "world", "batch"), [(49, 2, 4), (10, 3, 2), (100, 6, 8), (12, 1, 5)])
def test_even_shards_give_every_rank_as_many_batches(size, world, batch):
    """Before: training shards of 49 queries on 2 ranks took 7 and 6 batches of 4, and DDP hung at the
    epoch's end waiting for the gradients of rank 0's extra batch (found by a review)."""
    for epoch in (0, 1):
        shards = []
        for rank in range(world):
            sampler = ShardedEpochSampler(size, True, seed=4, rank=rank, world_size=world, even=True)
            sampler.set_epoch(epoch)
            shards.append([index for _, index in sampler])
            assert len(shards[-1]) == len(sampler) == size // world
        used = sorted(index for shard in shards for index in shard)
        assert len(set(used)) == len(used) == size - size % world  # each at most once, none padded
        left_out = set(range(size)) - set(used)
        if epoch == 0:
            first_left_out = left_out
    assert size % world == 0 or left_out != first_left_out  # others each epoch


def test_unshuffled_order_is_the_identity():
    assert [i for _, i in ShardedEpochSampler(7, False, rank=1, world_size=3)] == [1, 4]


def test_shuffle_is_reproducible_and_differs_per_epoch_and_seed():
    def order(seed, epoch, rank=0, world=1):
        sampler = ShardedEpochSampler(50, True, seed=seed, rank=rank, world_size=world)
        sampler.set_epoch(epoch)
        return [i for _, i in sampler]

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 1) != order(0, 2)
    assert order(0, 0) != order(1, 0)
    assert sorted(order(0, 5)) == list(range(50))
    # Ranks see the same permutation: every rank's shard is a slice of it.
    full = order(3, 1)
    assert order(3, 1, rank=1, world=2) == full[1::2]


def test_skip_applies_once_to_its_own_epoch():
    sampler = ShardedEpochSampler(20, True, seed=1, rank=0, world_size=2)
    sampler.resume(0, skip=4)
    sampler.set_epoch(0)
    full = ShardedEpochSampler(20, True, seed=1, rank=0, world_size=2)
    expected = list(full)
    assert list(sampler) == expected[4:]  # resumed mid-epoch: the first 4 of this shard are done
    assert list(sampler) == expected  # the skip is used up


def test_skip_is_dropped_when_the_epoch_changes():
    sampler = ShardedEpochSampler(20, True, seed=1)
    sampler.resume(0, skip=5)
    sampler.set_epoch(1)  # resumed state belonged to epoch 0
    reference = ShardedEpochSampler(20, True, seed=1)
    reference.set_epoch(1)
    assert list(sampler) == list(reference)
