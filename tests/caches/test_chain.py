"""The chain: order, promotion, write-through, per-layer timeouts, and failing open with counts."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from caches.base import CachedResponse, CacheError, CacheKey, CacheLayer, CacheStats
from caches.chain import CacheChain, LayerReport
from caches.memory import MemoryCache
from caches.redis_cache import RedisCache
from engine.breaker import Breaker
from tests.caches.conftest import PREFIX
from tests.clock import FakeClock

ROUTE = "/v1/chat/completions"
NO_HANG = 2.0  # seconds: a bound on "does not hang", far above any layer timeout used here
SHORT = 0.05  # the timeout given to fake layers that hang


def key(n: int = 1) -> CacheKey:
    return CacheKey(digest=f"{n:064x}", tenant="t1", model="m1", route=ROUTE)


def value(
    clock: FakeClock, body: bytes = b'{"choices":[]}', *, ttl: float = 600.0
) -> CachedResponse:
    return CachedResponse(
        body=body, created_at=clock.now, expires_at=clock.now + ttl, prompt_tokens=5
    )


class FakeLayer:
    """A layer backed by a MemoryCache that can be told to raise or to hang on every operation."""

    def __init__(
        self, clock: FakeClock, *, name: str = "fake", timeout: float | None = SHORT
    ) -> None:
        self.name = name
        self.timeout = timeout
        self.inner = MemoryCache(max_entries=100, max_bytes=1_000_000, clock=clock)
        self.error: Exception | None = None
        self.hang = False
        self.entered = asyncio.Event()

    async def _misbehave(self) -> None:
        self.entered.set()
        if self.hang:
            await asyncio.Event().wait()  # forever
        if self.error is not None:
            raise self.error

    async def get(self, key: CacheKey) -> CachedResponse | None:
        await self._misbehave()
        return await self.inner.get(key)

    async def set(self, key: CacheKey, value: CachedResponse) -> None:
        await self._misbehave()
        await self.inner.set(key, value)

    async def delete(self, key: CacheKey) -> bool:
        await self._misbehave()
        return await self.inner.delete(key)

    async def clear(self) -> int:
        await self._misbehave()
        return await self.inner.clear()

    async def stats(self) -> CacheStats:
        await self._misbehave()
        inner = await self.inner.stats()
        return CacheStats(layer=self.name, entries=inner.entries, bytes=inner.bytes)

    async def aclose(self) -> None:
        await self._misbehave()


@pytest.fixture
def l1(clock: FakeClock) -> MemoryCache:
    return MemoryCache(max_entries=100, max_bytes=1_000_000, clock=clock)


@pytest.fixture
async def l2(fake_redis: aioredis.Redis, clock: FakeClock) -> AsyncIterator[RedisCache]:
    cache = RedisCache(fake_redis, prefix=PREFIX, timeout=0.5, clock=clock, owns_client=False)
    try:
        yield cache
    finally:
        await cache.aclose()


@pytest.fixture
def chain(l1: MemoryCache, l2: RedisCache, clock: FakeClock) -> CacheChain:
    return CacheChain([l1, l2], clock=clock)


@pytest.fixture
def fake(clock: FakeClock) -> FakeLayer:
    return FakeLayer(clock)


def test_fake_layer_is_a_cache_layer(fake: FakeLayer) -> None:
    assert isinstance(fake, CacheLayer)


def test_layer_names_must_be_unique(clock: FakeClock) -> None:
    with pytest.raises(ValueError, match="unique"):
        CacheChain(
            [MemoryCache(max_entries=1, max_bytes=1), MemoryCache(max_entries=1, max_bytes=1)]
        )


# --- lookups --------------------------------------------------------------------------------------


async def test_miss_in_every_layer(chain: CacheChain) -> None:
    lookup = await chain.get(key())
    assert (lookup.value, lookup.layer) == (None, None)
    assert [name for name, _ in lookup.timings] == ["l1", "l2"]
    assert all(seconds >= 0 for _, seconds in lookup.timings)
    assert (chain.counters["l1"].misses, chain.counters["l2"].misses) == (1, 1)


async def test_hit_in_the_first_layer_stops_there(
    chain: CacheChain, l1: MemoryCache, clock: FakeClock
) -> None:
    stored = value(clock)
    await l1.set(key(), stored)
    lookup = await chain.get(key())
    assert (lookup.value, lookup.layer) == (stored, "l1")
    assert [name for name, _ in lookup.timings] == ["l1"]
    assert chain.counters["l1"].hits == 1
    assert chain.counters["l2"].hits + chain.counters["l2"].misses == 0


async def test_l2_hit_is_promoted_into_l1_with_its_original_times(
    chain: CacheChain, l1: MemoryCache, l2: RedisCache, clock: FakeClock
) -> None:
    stored = value(clock, ttl=300)
    await l2.set(key(), stored)
    clock.advance(10)

    lookup = await chain.get(key())
    assert (lookup.value, lookup.layer) == (stored, "l2")
    promoted = await l1.get(key())
    assert promoted == stored  # same created_at and expires_at, not re-stamped "now"
    assert chain.counters["l1"].stores == 1
    assert (chain.counters["l1"].misses, chain.counters["l2"].hits) == (1, 1)

    again = await chain.get(key())
    assert (again.value, again.layer) == (stored, "l1")


async def test_hit_is_promoted_into_every_faster_layer(l2: RedisCache, clock: FakeClock) -> None:
    first = MemoryCache(max_entries=10, max_bytes=10_000, clock=clock)
    second = FakeLayer(clock, name="l1b")
    chain = CacheChain([first, second, l2], clock=clock)
    stored = value(clock)
    await l2.set(key(), stored)
    assert (await chain.get(key())).layer == "l2"
    assert await first.get(key()) == stored
    assert await second.inner.get(key()) == stored


async def test_failed_promotion_still_returns_the_hit(
    l2: RedisCache, fake: FakeLayer, clock: FakeClock
) -> None:
    chain = CacheChain([fake, l2], clock=clock)
    stored = value(clock)
    await l2.set(key(), stored)
    fake.error = CacheError("read-only")
    lookup = await chain.get(key())
    assert (lookup.value, lookup.layer) == (stored, "l2")
    assert chain.counters["fake"].store_errors == 1
    assert chain.counters["fake"].stores == 0


@pytest.mark.parametrize(
    ("age", "max_age", "hit"),
    [
        pytest.param(100, None, True, id="no-max-age"),
        pytest.param(100, 50, False, id="older-than-max-age"),
        pytest.param(100, 100, True, id="exactly-max-age"),
        pytest.param(100, 101, True, id="younger-than-max-age"),
        pytest.param(0, 0, True, id="max-age-0-fresh"),
        pytest.param(1, 0, False, id="max-age-0-one-second-old"),
    ],
)
async def test_max_age_filters_old_entries(
    chain: CacheChain,
    l1: MemoryCache,
    l2: RedisCache,
    clock: FakeClock,
    age: int,
    max_age: int | None,
    hit: bool,
) -> None:
    stored = value(clock)
    await chain.set(key(), stored)
    await chain.settle()  # L2's write happens in the background
    clock.advance(age)
    lookup = await chain.get(key(), max_age=max_age)
    assert (lookup.value is not None) is hit
    if not hit:
        # Too old in every layer: each one counts a miss, nothing is promoted.
        assert (chain.counters["l1"].misses, chain.counters["l2"].misses) == (1, 1)
        assert await l1.get(key()) == stored  # still held for requests without max-age


async def test_max_age_skips_a_stale_l1_entry_for_a_fresher_l2_one(
    chain: CacheChain, l1: MemoryCache, l2: RedisCache, clock: FakeClock
) -> None:
    await l1.set(key(), value(clock, b"old"))
    clock.advance(100)
    fresh = value(clock, b"fresh")
    await l2.set(key(), fresh)
    lookup = await chain.get(key(), max_age=10)
    assert (lookup.value, lookup.layer) == (fresh, "l2")


# --- failing layers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(CacheError("down"), id="CacheError"),
        pytest.param(RedisConnectionError("refused"), id="redis-ConnectionError"),
        pytest.param(OSError("broken pipe"), id="OSError"),
        pytest.param(TimeoutError(), id="TimeoutError"),
        pytest.param(RuntimeError("bug"), id="RuntimeError"),
    ],
)
async def test_raising_layer_is_a_counted_miss(
    l1: MemoryCache, fake: FakeLayer, clock: FakeClock, error: Exception
) -> None:
    chain = CacheChain([l1, fake], clock=clock)
    fake.error = error
    lookup = await chain.get(key())
    assert (lookup.value, lookup.layer) == (None, None)
    assert [name for name, _ in lookup.timings] == ["l1", "fake"]
    assert chain.counters["fake"].errors == 1
    assert chain.counters["fake"].misses == 0
    assert chain.failing("fake")


async def test_failing_layer_is_skipped_for_the_next_one(
    fake: FakeLayer, l2: RedisCache, clock: FakeClock
) -> None:
    chain = CacheChain([fake, l2], clock=clock)
    stored = value(clock)
    await l2.set(key(), stored)
    fake.error = CacheError("down")
    lookup = await chain.get(key())
    assert (lookup.value, lookup.layer) == (stored, "l2")
    assert chain.counters["fake"].errors == 1


async def test_hanging_layer_is_cut_by_its_timeout(
    l1: MemoryCache, fake: FakeLayer, clock: FakeClock
) -> None:
    chain = CacheChain([l1, fake], clock=clock)
    fake.hang = True
    lookup = await asyncio.wait_for(chain.get(key()), NO_HANG)
    assert (lookup.value, lookup.layer) == (None, None)
    assert chain.counters["fake"].errors == 1
    assert chain.failing("fake")


async def test_hanging_faster_layer_neither_blocks_the_hit_nor_its_promotion(
    fake: FakeLayer, l2: RedisCache, clock: FakeClock
) -> None:
    chain = CacheChain([fake, l2], clock=clock)
    stored = value(clock)
    await l2.set(key(), stored)
    fake.hang = True
    lookup = await asyncio.wait_for(chain.get(key()), NO_HANG)
    assert (lookup.value, lookup.layer) == (stored, "l2")
    # The promotion into the hanging layer is cut by the timeout too, and counted.
    assert chain.counters["fake"].store_errors == 1
    assert chain.counters["fake"].stores == 0


async def test_cancellation_is_not_swallowed(clock: FakeClock) -> None:
    layer = FakeLayer(clock, timeout=None)
    layer.hang = True
    chain = CacheChain([layer], clock=clock)
    task = asyncio.create_task(chain.get(key()))
    await asyncio.wait_for(layer.entered.wait(), NO_HANG)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert chain.counters["fake"].errors == 0


async def test_failure_and_recovery_are_logged_once_each(
    l1: MemoryCache, fake: FakeLayer, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    chain = CacheChain([l1, fake], clock=clock)
    fake.error = CacheError("down")
    with caplog.at_level(logging.WARNING, logger="caches.chain"):
        for _ in range(3):
            await chain.get(key())
        assert chain.failing("fake")
        fake.error = None
        await chain.get(key())
        await chain.get(key())
    messages = [r.getMessage() for r in caplog.records if r.name == "caches.chain"]
    assert len(messages) == 2
    assert "fake" in messages[0]
    assert "failing" in messages[0]
    assert "CacheError: down" in messages[0]
    assert "fake" in messages[1]
    assert "recovered" in messages[1]
    assert not chain.failing("fake")
    assert chain.counters["fake"].errors == 3
    assert chain.counters["fake"].misses == 2


async def test_failed_store_is_a_store_error_not_a_lookup_error(
    l1: MemoryCache, fake: FakeLayer, clock: FakeClock
) -> None:
    chain = CacheChain([l1, fake], clock=clock)
    fake.error = CacheError("read-only")
    await chain.set(key(), value(clock))
    await chain.settle()  # L2's write happens in the background
    assert chain.counters["fake"].store_errors == 1
    assert chain.counters["fake"].errors == 0


# --- writes ---------------------------------------------------------------------------------------


async def test_set_writes_through_every_layer(
    chain: CacheChain, l1: MemoryCache, l2: RedisCache, clock: FakeClock
) -> None:
    stored = value(clock)
    await chain.set(key(), stored)
    await chain.settle()  # L2's write happens in the background
    assert await l1.get(key()) == stored
    assert await l2.get(key()) == stored
    assert (chain.counters["l1"].stores, chain.counters["l2"].stores) == (1, 1)


@pytest.mark.parametrize("mode", ["raise", "hang"])
async def test_store_errors_are_counted_and_other_layers_still_written(
    l1: MemoryCache, fake: FakeLayer, clock: FakeClock, mode: str
) -> None:
    chain = CacheChain([fake, l1], clock=clock)
    fake.error = CacheError("full") if mode == "raise" else None
    fake.hang = mode == "hang"
    stored = value(clock)
    await asyncio.wait_for(chain.set(key(), stored), NO_HANG)
    await chain.settle()  # L2's write happens in the background
    assert await l1.get(key()) == stored
    assert (chain.counters["fake"].stores, chain.counters["fake"].store_errors) == (0, 1)
    assert (chain.counters["l1"].stores, chain.counters["l1"].store_errors) == (1, 0)


async def test_delete_removes_from_every_layer(
    chain: CacheChain, l1: MemoryCache, l2: RedisCache, clock: FakeClock
) -> None:
    await chain.set(key(), value(clock))
    await chain.settle()  # L2's write happens in the background
    assert await chain.delete(key()) == 2
    assert await l1.get(key()) is None
    assert await l2.get(key()) is None
    assert await chain.delete(key()) == 0


async def test_delete_skips_a_failing_layer(
    l1: MemoryCache, fake: FakeLayer, clock: FakeClock
) -> None:
    chain = CacheChain([l1, fake], clock=clock)
    await chain.set(key(), value(clock))
    await chain.settle()  # L2's write happens in the background
    fake.error = CacheError("down")
    assert await chain.delete(key()) == 1
    assert chain.counters["fake"].store_errors == 1  # a delete is a write
    assert chain.counters["fake"].errors == 0


async def test_clear_reports_per_layer_with_none_for_a_failing_one(
    l1: MemoryCache, l2: RedisCache, fake: FakeLayer, clock: FakeClock
) -> None:
    chain = CacheChain([l1, fake, l2], clock=clock)
    for n in range(3):
        await chain.set(key(n), value(clock))
        await chain.settle()  # L2's write happens in the background
    fake.error = CacheError("down")
    assert await chain.clear() == {"l1": 3, "fake": None, "l2": 3}
    assert (await l2.stats()).entries == 0


# --- stats and close ------------------------------------------------------------------------------


async def test_stats_report_contents_and_counters_per_layer(
    l1: MemoryCache, l2: RedisCache, fake: FakeLayer, clock: FakeClock
) -> None:
    chain = CacheChain([l1, l2, fake], clock=clock)
    await chain.set(key(1), value(clock, b"a" * 10))
    await chain.settle()  # L2's write happens in the background
    await chain.get(key(1))  # l1 hit
    await chain.get(key(2))  # miss everywhere
    fake.error = CacheError("down")
    await chain.get(key(3))  # fake fails
    reports = {r.layer: r for r in await chain.stats()}

    assert list(reports) == ["l1", "l2", "fake"]
    assert reports["l1"] == LayerReport(
        layer="l1",
        entries=1,
        bytes=10,
        hits=1,
        misses=2,
        errors=0,
        stores=1,
        store_errors=0,
        available=True,
    )
    assert reports["l2"].entries == 1
    assert reports["l2"].bytes is not None
    assert reports["l2"].bytes >= 10
    assert (reports["l2"].hits, reports["l2"].misses, reports["l2"].available) == (0, 2, True)
    assert reports["fake"] == LayerReport(
        layer="fake",
        entries=None,
        bytes=None,
        hits=0,
        misses=1,
        errors=1,
        stores=1,
        store_errors=0,
        available=False,
    )


async def test_aclose_closes_every_layer_even_if_one_fails(
    l1: MemoryCache, fake: FakeLayer, clock: FakeClock
) -> None:
    second = MemoryCache(max_entries=10, max_bytes=10_000, clock=clock)
    second.name = "l1b"
    chain = CacheChain([fake, l1, second], clock=clock)
    await chain.set(key(), value(clock))
    await chain.settle()  # L2's write happens in the background
    fake.error = CacheError("down")
    await chain.aclose()
    assert (len(l1), len(second)) == (0, 0)  # MemoryCache.aclose empties it


class CountingGate:
    """A gate that shuts after `threshold` failures in a row and opens on `reopen()`."""

    state = "closed"

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self.failures = 0
        self.successes = 0
        self.shut = False

    def allow(self) -> bool:
        return not self.shut

    def success(self) -> None:
        self.successes += 1
        self.failures = 0

    def failure(self) -> None:
        self.failures += 1
        self.shut = self.failures >= self.threshold


async def test_a_shut_gate_skips_its_layer_without_calling_it(
    fake: FakeLayer, l1: MemoryCache, clock: FakeClock
) -> None:
    gate = CountingGate(threshold=2)
    chain = CacheChain([l1, fake], clock=clock, gates={"fake": gate})
    fake.hang = True  # a blackholed backend: every call waits for its timeout
    for _ in range(2):
        assert (await asyncio.wait_for(chain.get(key()), NO_HANG)).value is None
    assert gate.shut
    fake.entered.clear()
    lookup = await asyncio.wait_for(chain.get(key(2)), NO_HANG)
    assert lookup.value is None
    assert not fake.entered.is_set()  # not called at all
    assert lookup.timings[1][1] == 0.0  # not asked: reported as no time at all
    await chain.set(key(3), value(clock))  # writes skip it too, and still reach L1
    await chain.settle()  # L2's write happens in the background
    assert not fake.entered.is_set()
    assert (await chain.get(key(3))).layer == l1.name
    assert chain.counters["fake"].errors == 3
    assert chain.counters["fake"].store_errors == 1


async def test_a_gate_hears_of_every_success_and_failure(fake: FakeLayer, clock: FakeClock) -> None:
    gate = CountingGate(threshold=5)
    chain = CacheChain([fake], clock=clock, gates={"fake": gate})
    await chain.set(key(), value(clock))
    await chain.settle()  # L2's write happens in the background
    assert (await chain.get(key())).value is not None
    fake.error = CacheError("down")
    await chain.get(key())
    await chain.delete(key())
    assert (gate.successes, gate.failures) == (2, 2)


def test_gates_must_name_layers_of_the_chain(l1: MemoryCache, clock: FakeClock) -> None:
    with pytest.raises(ValueError, match="not in the chain"):
        CacheChain([l1], clock=clock, gates={"l9": CountingGate(1)})


async def test_a_half_open_trial_runs_in_the_background(
    fake: FakeLayer, l1: MemoryCache, clock: FakeClock
) -> None:
    breaker = Breaker(threshold=1, cooldown=0.05)
    chain = CacheChain([l1, fake], clock=clock, gates={"fake": breaker})
    fake.hang = True
    await chain.get(key())  # times out: open
    assert breaker.state == "open"
    await asyncio.sleep(0.06)
    fake.entered.clear()
    lookup = await asyncio.wait_for(chain.get(key(2)), NO_HANG)
    assert lookup.timings[1][1] < SHORT  # the request did not wait for the trial
    await asyncio.wait_for(fake.entered.wait(), NO_HANG)  # but the trial did call the layer
    await asyncio.sleep(SHORT * 2)
    assert breaker.state == "open"  # the trial timed out in the background
    fake.hang = False
    await asyncio.sleep(0.06)
    await chain.get(key(3))  # the next trial, in the background, succeeds
    await asyncio.sleep(0.01)
    assert breaker.state == "closed"
    stored = value(clock)
    await chain.set(key(4), stored)
    await chain.settle()  # L2's write happens in the background
    assert (await chain.get(key(4))).value == stored
    await chain.aclose()
