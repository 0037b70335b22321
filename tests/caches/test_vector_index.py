"""The vector index: per-partition search, exact then HNSW, removal, expiry, eviction."""

from __future__ import annotations

import numpy as np
import pytest

from caches.vector_index import VectorIndex
from tests.clock import FakeClock


def unit(seed: int, dim: int = 16) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return v / np.linalg.norm(v)


def make(clock: FakeClock, **kw: int) -> VectorIndex:
    return VectorIndex(16, clock=clock, **kw)


def test_search_stays_inside_the_partition(clock: FakeClock) -> None:
    index = make(clock)
    index.add("a", "p1", unit(1), clock.now + 60)
    index.add("b", "p2", unit(1), clock.now + 60)  # the same vector, another partition
    matches = index.search("p1", unit(1))
    assert [m.entry_id for m in matches] == ["a"]
    assert matches[0].similarity == pytest.approx(1.0, abs=1e-5)
    assert index.search("p3", unit(1)) == []


def test_nearest_first(clock: FakeClock) -> None:
    index = make(clock)
    for i in range(10):
        index.add(f"e{i}", "p", unit(i), clock.now + 60)
    assert index.search("p", unit(3), k=1)[0].entry_id == "e3"
    sims = [m.similarity for m in index.search("p", unit(3), k=5)]
    assert sims == sorted(sims, reverse=True)


@pytest.mark.parametrize("threshold", [1_000, 8])
def test_exact_and_hnsw_agree_and_support_removal(clock: FakeClock, threshold: int) -> None:
    index = make(clock, hnsw_threshold=threshold)
    for i in range(40):
        index.add(f"e{i}", "p", unit(i), clock.now + 60)
    assert index.search("p", unit(7), k=1)[0].entry_id == "e7"
    assert index.remove("e7")
    assert "e7" not in index
    assert all(m.entry_id != "e7" for m in index.search("p", unit(7), k=5))
    for i in range(8, 30):  # many removals force an HNSW rebuild
        index.remove(f"e{i}")
    assert index.search("p", unit(35), k=1)[0].entry_id == "e35"
    assert index.partition_size("p") == 40 - 1 - 22


def test_expired_entries_are_never_returned(clock: FakeClock) -> None:
    index = make(clock)
    index.add("old", "p", unit(1), clock.now + 5)
    index.add("new", "p", unit(2), clock.now + 100)
    clock.advance(10)
    assert [m.entry_id for m in index.search("p", unit(1), k=5)] == ["new"]
    assert "old" not in index


def test_oldest_evicted_past_max_entries(clock: FakeClock) -> None:
    index = make(clock, max_entries=3)
    for i in range(5):
        index.add(f"e{i}", f"p{i % 2}", unit(i), clock.now + 60)
    assert len(index) == 3
    assert "e0" not in index
    assert "e1" not in index
    assert "e4" in index


def test_re_adding_an_id_replaces_it(clock: FakeClock) -> None:
    index = make(clock)
    index.add("a", "p", unit(1), clock.now + 60)
    index.add("a", "p", unit(2), clock.now + 60)
    assert len(index) == 1
    assert index.search("p", unit(2), k=1)[0].similarity == pytest.approx(1.0, abs=1e-5)


def test_wrong_dimension_is_refused(clock: FakeClock) -> None:
    with pytest.raises(ValueError, match="shape"):
        make(clock).add("a", "p", np.ones(8, dtype=np.float32), clock.now + 1)
