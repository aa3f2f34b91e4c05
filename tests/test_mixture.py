"""The mixture plan: realised ratios, determinism in (seed, epoch, rank), disjoint ranks, stratified batches,
passes over small sources."""

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lit_mllm.data import Mixture

weights_st = st.dictionaries(
    st.sampled_from(["caption", "interleaved", "text", "instruct", "grounding"]),
    st.floats(0.05, 10),
    min_size=1,
    max_size=5,
)


@settings(max_examples=30, deadline=None)
@given(weights=weights_st, seed=st.integers(0, 2**16), epoch=st.integers(0, 5))
def test_realised_ratio_within_binomial_tolerance(weights, seed, epoch):
    mix = Mixture({n: 1000 for n in weights}, weights, batch_size=16, seed=seed, samples_per_epoch=8000)
    counts = Counter(name for batch in mix.batches(epoch) for name, _ in batch)
    n, total = sum(counts.values()), sum(weights.values())
    assert n == 8000
    for name, w in weights.items():
        p = w / total
        assert abs(counts[name] - n * p) <= 5 * np.sqrt(n * p * (1 - p)) + 1, (name, counts[name], n * p)


@settings(max_examples=20, deadline=None)
@given(weights=weights_st, seed=st.integers(0, 100), world=st.integers(1, 4))
def test_same_seed_epoch_rank_same_order_and_ranks_disjoint(weights, seed, world):
    sizes = {n: 500 for n in weights}
    mix = Mixture(sizes, weights, batch_size=4, seed=seed, samples_per_epoch=400)
    again = Mixture(sizes, weights, batch_size=4, seed=seed, samples_per_epoch=400)
    per_rank = [mix.batches(0, r, world) for r in range(world)]
    assert per_rank == [again.batches(0, r, world) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # every rank steps the same number of times (no DDP hang)
    seen = [draw for rank in per_rank for batch in rank for draw in batch]
    assert len(seen) == len(set(seen))  # no record on two ranks (sources are not exhausted here)
    assert mix.batches(1) != mix.batches(0)  # a new epoch is a new order


def test_weights_are_keyed_by_name_not_position():
    a = Mixture({"x": 100, "y": 100}, {"x": 3, "y": 1}, batch_size=8, seed=1)
    b = Mixture({"y": 100, "x": 100}, {"y": 1, "x": 3}, batch_size=8, seed=1)
    assert a.batches(0) == b.batches(0)
    # adding a source does not reshuffle the records another source gives (same name -> same permutation)
    c = Mixture({"x": 100, "y": 100, "z": 50}, {"x": 3, "y": 1, "z": 0}, batch_size=8, seed=1)
    assert c.batches(0) == a.batches(0)


@settings(max_examples=25, deadline=None)
@given(weights=weights_st, batch=st.integers(1, 24), seed=st.integers(0, 50))
def test_stratified_batches_hold_the_ratio(weights, batch, seed):
    mix = Mixture({n: 300 for n in weights}, weights, batch_size=batch, seed=seed, stratified=True)
    total = sum(weights.values())
    for b in mix.batches(0)[:20]:
        counts = Counter(name for name, _ in b)
        assert len(b) == batch
        for name, w in weights.items():
            assert int(np.floor(w / total * batch)) <= counts[name] <= int(np.ceil(w / total * batch))


def test_small_source_passes_are_counted_and_exhaust_before_repeating():
    mix = Mixture(
        {"big": 1000, "small": 10}, {"big": 1, "small": 1}, batch_size=10, seed=0, samples_per_epoch=200
    )
    draws = [i for b in mix.batches(0) for n, i in b if n == "small"]
    passes = mix.passes(0)
    assert passes["small"] == pytest.approx(len(draws) / 10) and passes["small"] > 5
    for k in range(0, len(draws) - 9, 10):  # each pass is a permutation of all ten records
        assert sorted(draws[k : k + 10]) == list(range(10))


def test_bad_mixtures_are_refused_clearly():
    with pytest.raises(ValueError, match="same names"):
        Mixture({"a": 1}, {"b": 1}, batch_size=1)
    with pytest.raises(ValueError, match="positive weight but no records"):
        Mixture({"a": 0, "b": 5}, {"a": 1, "b": 1}, batch_size=1)
    with pytest.raises(ValueError, match="no full batch"):
        Mixture({"a": 3}, {"a": 1}, batch_size=4)
