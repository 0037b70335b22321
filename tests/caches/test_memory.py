"""L1: an LRU bounded by entry count and body bytes, with per-entry expiry on an injected clock."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from caches.base import CachedResponse, CacheKey, CacheLayer, CacheStats
from caches.memory import MemoryCache
from tests.clock import FakeClock


def key(n: int) -> CacheKey:
    return CacheKey(digest=f"{n:064x}", tenant="t1", model="m1", route="/v1/chat/completions")


def value(
    clock: FakeClock, size: int = 10, *, ttl: float = 60.0, fill: bytes = b"x"
) -> CachedResponse:
    return CachedResponse(body=fill * size, created_at=clock.now, expires_at=clock.now + ttl)


def make(clock: FakeClock, *, max_entries: int = 100, max_bytes: int = 10_000) -> MemoryCache:
    return MemoryCache(max_entries=max_entries, max_bytes=max_bytes, clock=clock)


async def present(cache: MemoryCache, *ns: int) -> list[int]:
    return [n for n in ns if await cache.get(key(n)) is not None]


def test_is_a_cache_layer(clock: FakeClock) -> None:
    cache = make(clock)
    assert isinstance(cache, CacheLayer)
    assert cache.name == "l1"
    assert cache.timeout is None


@pytest.mark.parametrize(
    ("max_entries", "max_bytes"),
    [pytest.param(-1, 10, id="entries"), pytest.param(10, -1, id="bytes")],
)
def test_negative_bounds_are_rejected(max_entries: int, max_bytes: int) -> None:
    with pytest.raises(ValueError, match="non-negative"):
        MemoryCache(max_entries=max_entries, max_bytes=max_bytes)


async def test_evicts_least_recently_set_beyond_max_entries(clock: FakeClock) -> None:
    cache = make(clock, max_entries=3)
    for n in range(4):
        await cache.set(key(n), value(clock))
    assert len(cache) == 3
    assert await present(cache, 0, 1, 2, 3) == [1, 2, 3]


async def test_recently_read_entry_survives_count_eviction(clock: FakeClock) -> None:
    cache = make(clock, max_entries=3)
    for n in range(3):
        await cache.set(key(n), value(clock))
    assert await cache.get(key(0)) is not None  # 0 becomes the most recently used
    await cache.set(key(3), value(clock))
    assert await present(cache, 0, 1, 2, 3) == [0, 2, 3]


def test_recently_peeked_entry_survives_count_eviction(clock: FakeClock) -> None:
    cache = make(clock, max_entries=2)
    cache.put(key(0), value(clock))
    cache.put(key(1), value(clock))
    assert cache.peek(key(0)) is not None
    cache.put(key(2), value(clock))
    assert cache.peek(key(1)) is None
    assert cache.peek(key(0)) is not None


async def test_overwrite_makes_entry_most_recently_used(clock: FakeClock) -> None:
    cache = make(clock, max_entries=3)
    for n in range(3):
        await cache.set(key(n), value(clock))
    await cache.set(key(0), value(clock, fill=b"y"))
    await cache.set(key(3), value(clock))
    assert await present(cache, 0, 1, 2, 3) == [0, 2, 3]


async def test_evicts_least_recently_used_beyond_max_bytes(clock: FakeClock) -> None:
    cache = make(clock, max_bytes=100)
    await cache.set(key(0), value(clock, 40))
    await cache.set(key(1), value(clock, 40))
    await cache.set(key(2), value(clock, 40))
    assert await present(cache, 0, 1, 2) == [1, 2]
    assert cache.bytes == 80


async def test_recently_read_entry_survives_byte_eviction(clock: FakeClock) -> None:
    cache = make(clock, max_bytes=100)
    await cache.set(key(0), value(clock, 40))
    await cache.set(key(1), value(clock, 40))
    assert await cache.get(key(0)) is not None
    await cache.set(key(2), value(clock, 40))
    assert await present(cache, 0, 1, 2) == [0, 2]
    assert cache.bytes == 80


async def test_one_large_value_evicts_as_many_as_needed(clock: FakeClock) -> None:
    cache = make(clock, max_bytes=100)
    for n in range(3):
        await cache.set(key(n), value(clock, 30))
    await cache.set(key(3), value(clock, 80))
    assert await present(cache, 0, 1, 2, 3) == [3]
    assert cache.bytes == 80


async def test_value_of_exactly_max_bytes_is_stored(clock: FakeClock) -> None:
    cache = make(clock, max_bytes=100)
    await cache.set(key(0), value(clock, 50))
    await cache.set(key(1), value(clock, 100))
    assert await present(cache, 0, 1) == [1]
    assert cache.bytes == 100


async def test_value_larger_than_max_bytes_is_not_stored_and_evicts_nothing(
    clock: FakeClock,
) -> None:
    cache = make(clock, max_bytes=100)
    await cache.set(key(0), value(clock, 50))
    await cache.set(key(1), value(clock, 101))
    assert await present(cache, 0, 1) == [0]
    assert cache.bytes == 50


async def test_expired_entry_is_not_returned_and_is_dropped(clock: FakeClock) -> None:
    cache = make(clock)
    stored = value(clock, 25, ttl=10)
    await cache.set(key(0), stored)
    clock.advance(9.5)
    assert await cache.get(key(0)) == stored
    clock.advance(0.5)  # now == expires_at: expired
    assert await cache.get(key(0)) is None
    assert len(cache) == 0
    assert cache.bytes == 0


async def test_value_already_expired_is_not_stored(clock: FakeClock) -> None:
    cache = make(clock)
    stale = value(clock, ttl=5)
    clock.advance(5)
    await cache.set(key(0), stale)
    assert len(cache) == 0
    assert await cache.get(key(0)) is None


async def test_overwrite_adjusts_bytes(clock: FakeClock) -> None:
    cache = make(clock)
    await cache.set(key(0), value(clock, 40))
    await cache.set(key(1), value(clock, 5))
    replacement = value(clock, 10, fill=b"z")
    await cache.set(key(0), replacement)
    assert len(cache) == 2
    assert cache.bytes == 15
    assert await cache.get(key(0)) == replacement


async def test_same_digest_with_other_key_material_is_a_miss_and_keeps_the_entry(
    clock: FakeClock,
) -> None:
    cache = make(clock)
    stored = value(clock)
    await cache.set(key(0), stored)
    other_tenant = CacheKey(digest=key(0).digest, tenant="t2", model="m1", route=key(0).route)
    assert await cache.get(other_tenant) is None
    assert await cache.get(key(0)) == stored


@pytest.mark.parametrize(
    ("max_entries", "max_bytes"),
    [pytest.param(0, 10_000, id="max_entries-0"), pytest.param(100, 0, id="max_bytes-0")],
)
async def test_zero_bound_disables_the_layer(
    clock: FakeClock, max_entries: int, max_bytes: int
) -> None:
    cache = make(clock, max_entries=max_entries, max_bytes=max_bytes)
    assert not cache.enabled
    await cache.set(key(0), value(clock, 0))
    await cache.set(key(1), value(clock, 10))
    assert await present(cache, 0, 1) == []
    assert await cache.stats() == CacheStats(layer="l1", entries=0, bytes=0)


async def test_stats_count_entries_and_body_bytes(clock: FakeClock) -> None:
    cache = make(clock)
    assert await cache.stats() == CacheStats(layer="l1", entries=0, bytes=0)
    await cache.set(key(0), value(clock, 7))
    await cache.set(key(1), value(clock, 13))
    assert await cache.stats() == CacheStats(layer="l1", entries=2, bytes=20)


async def test_delete(clock: FakeClock) -> None:
    cache = make(clock)
    await cache.set(key(0), value(clock, 7))
    await cache.set(key(1), value(clock, 13))
    assert await cache.delete(key(0)) is True
    assert await cache.delete(key(0)) is False
    assert await cache.delete(key(9)) is False
    assert await present(cache, 0, 1) == [1]
    assert cache.bytes == 13


async def test_clear_returns_count_and_empties(clock: FakeClock) -> None:
    cache = make(clock)
    for n in range(3):
        await cache.set(key(n), value(clock, 10))
    assert await cache.clear() == 3
    assert await cache.stats() == CacheStats(layer="l1", entries=0, bytes=0)
    assert await cache.clear() == 0


async def test_aclose_drops_everything(clock: FakeClock) -> None:
    cache = make(clock)
    await cache.set(key(0), value(clock))
    await cache.aclose()
    assert len(cache) == 0


# --- property: bounds always hold and byte accounting never drifts ---------------------------

ops = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.integers(0, 7), st.integers(0, 60), st.integers(1, 30)),
        st.tuples(st.just("get"), st.integers(0, 7)),
        st.tuples(st.just("delete"), st.integers(0, 7)),
        st.tuples(st.just("advance"), st.integers(1, 20)),
    ),
    max_size=60,
)


@given(st.integers(0, 5), st.integers(0, 120), ops)
async def test_bounds_hold_after_any_sequence(
    max_entries: int, max_bytes: int, script: list[tuple[Any, ...]]
) -> None:
    clock = FakeClock()
    cache = make(clock, max_entries=max_entries, max_bytes=max_bytes)
    for op in script:
        if op[0] == "set":
            _, n, size, ttl = op
            stored = value(clock, size, ttl=ttl)
            cache.put(key(n), stored)
            # A storable value is readable right after it is set.
            if cache.enabled and size <= max_bytes:
                assert cache.peek(key(n)) == stored
        elif op[0] == "get":
            await cache.get(key(op[1]))
        elif op[0] == "delete":
            await cache.delete(key(op[1]))
        else:
            clock.advance(op[1])
        assert len(cache) <= max_entries
        assert 0 <= cache.bytes <= max_bytes
    # Once everything has expired and been seen, nothing is held and no bytes are left over.
    clock.advance(1_000)
    for n in range(8):
        assert cache.peek(key(n)) is None
    assert len(cache) == 0
    assert cache.bytes == 0


async def test_overwrite_with_an_unstorable_value_drops_the_older_one(clock: FakeClock) -> None:
    cache = make(clock, max_bytes=100)
    await cache.set(key(1), value(clock, size=10))
    await cache.set(key(1), value(clock, size=500))  # newer answer, too large to keep
    assert await cache.get(key(1)) is None
    assert cache.bytes == 0
