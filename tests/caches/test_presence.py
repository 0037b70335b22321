"""The L2 key-presence mirror against a real redis-server: what it may skip, and that it stops
skipping whenever it cannot be sure (connection lost, server restarted, no tracking support)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import fakeredis
import pytest
import redis.asyncio as aioredis

from caches.redis_cache import RedisCache, connect
from tests.caches.conftest import PREFIX, TIMEOUT
from tests.caches.test_redis_cache import key, rkey, value
from tests.clock import FakeClock
from tests.polling import eventually
from tests.redisproc import RedisServer

SETTLE = 5.0  # seconds a mirror may take to (re)sync in these tests; it usually takes a few ms


async def get_calls(client: aioredis.Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_get", {}).get("calls", 0))


@pytest.fixture
async def tracked(
    redis_server: RedisServer, redis_client: aioredis.Redis, clock: FakeClock
) -> AsyncIterator[RedisCache]:
    """RedisCache with the mirror on, synced; fast retries so restarts resync within a test."""
    cache = RedisCache(
        connect(redis_server.url, timeout=TIMEOUT, max_connections=8),
        prefix=PREFIX, timeout=TIMEOUT, clock=clock, presence=True,
    )  # fmt: skip
    assert cache.presence is not None
    cache.presence._retry_delay = (0.05, 0.2)
    cache.presence._heartbeat = 0.3
    await cache.start()
    assert await cache.presence.wait_synced(SETTLE)
    try:
        yield cache
    finally:
        await cache.aclose()


@pytest.fixture
async def other(redis_server: RedisServer, clock: FakeClock) -> AsyncIterator[RedisCache]:
    """Another replica's L2, without a mirror."""
    cache = RedisCache(
        connect(redis_server.url, timeout=TIMEOUT, max_connections=4),
        prefix=PREFIX, timeout=TIMEOUT, clock=clock,
    )  # fmt: skip
    try:
        yield cache
    finally:
        await cache.aclose()


async def test_an_unknown_key_is_a_miss_without_asking_redis(
    tracked: RedisCache, redis_client: aioredis.Redis
) -> None:
    assert tracked.presence is not None
    before = await get_calls(redis_client)
    assert await tracked.get(key(1)) is None
    assert await get_calls(redis_client) == before
    assert tracked.presence.skips == 1


async def test_entries_written_by_another_replica_are_found(
    tracked: RedisCache, other: RedisCache, clock: FakeClock
) -> None:
    assert tracked.presence is not None
    stored = value(clock, b"from B")
    await other.set(key(2), stored)
    assert await tracked.presence.caught_up()
    assert await tracked.get(key(2)) == stored


async def test_entries_that_existed_before_the_mirror_started_are_found(
    redis_server: RedisServer, redis_client: aioredis.Redis, other: RedisCache, clock: FakeClock
) -> None:
    old = [value(clock, f"old {n}".encode()) for n in range(2500)]  # more than one SCAN batch
    for n, stored in enumerate(old):
        await other.set(key(n), stored)
    cache = RedisCache(
        connect(redis_server.url, timeout=TIMEOUT, max_connections=4),
        prefix=PREFIX, timeout=TIMEOUT, clock=clock, presence=True,
    )  # fmt: skip
    assert cache.presence is not None
    try:
        assert await cache.get(key(7)) == old[7]  # before the first sync: asks Redis
        await cache.start()
        assert await cache.presence.wait_synced(SETTLE)
        assert len(cache.presence) == 2500
        assert await cache.get(key(2499)) == old[2499]
        assert await cache.get(key(2500)) is None
    finally:
        await cache.aclose()


async def test_own_writes_are_present_at_once(tracked: RedisCache, clock: FakeClock) -> None:
    stored = value(clock, b"mine")
    await tracked.set(key(3), stored)
    assert await tracked.get(key(3)) == stored


async def test_a_lost_tracking_connection_stops_skipping_until_resynced(
    tracked: RedisCache, other: RedisCache, redis_client: aioredis.Redis, clock: FakeClock
) -> None:
    presence = tracked.presence
    assert presence is not None
    killed = await redis_client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    assert killed == 1
    await eventually(lambda: not presence.synced, SETTLE)
    # Written while the mirror is down (its invalidation went nowhere): found all the same,
    # first by asking Redis, then by the SCAN of the resync.
    stored = value(clock, b"during the outage")
    await other.set(key(4), stored)
    assert await tracked.get(key(4)) == stored
    await eventually(lambda: presence.synced, SETTLE)
    assert presence.syncs >= 2
    assert await tracked.get(key(4)) == stored


async def test_a_restarted_server_is_followed_again(
    tracked: RedisCache, other: RedisCache, redis_server: RedisServer, clock: FakeClock
) -> None:
    presence = tracked.presence
    assert presence is not None
    syncs = presence.syncs
    redis_server.stop()
    try:
        await eventually(lambda: not presence.synced, SETTLE)
    finally:
        redis_server.start()
    await eventually(lambda: presence.synced and presence.syncs > syncs, SETTLE)
    stored = value(clock, b"after the restart")
    await other.set(key(5), stored)
    assert await presence.caught_up()
    assert await tracked.get(key(5)) == stored


async def test_a_flush_empties_the_mirror(
    tracked: RedisCache, redis_client: aioredis.Redis, clock: FakeClock
) -> None:
    presence = tracked.presence
    assert presence is not None
    await tracked.set(key(6), value(clock))
    assert len(presence) == 1
    await redis_client.flushdb()
    assert await presence.caught_up()
    assert len(presence) == 0
    assert await tracked.get(key(6)) is None


async def test_a_rebuild_forgets_keys_that_are_gone(
    redis_server: RedisServer, redis_client: aioredis.Redis, clock: FakeClock
) -> None:
    cache = RedisCache(
        connect(redis_server.url, timeout=TIMEOUT, max_connections=4),
        prefix=PREFIX, timeout=TIMEOUT, clock=clock, presence=True,
    )  # fmt: skip
    presence = cache.presence
    assert presence is not None
    presence._resync_interval = 0.2
    try:
        await cache.start()
        assert await presence.wait_synced(SETTLE)
        await cache.set(key(8), value(clock))
        await cache.set(key(9), value(clock))
        await redis_client.unlink(rkey(key(8)))
        assert await presence.caught_up()
        assert len(presence) == 2  # an invalidation does not say "deleted": still present
        syncs = presence.syncs
        await eventually(lambda: presence.syncs > syncs, SETTLE)
        assert len(presence) == 1
        assert await cache.get(key(8)) is None
        assert presence.skips == 1
    finally:
        await cache.aclose()


async def test_keys_outside_the_prefix_are_not_followed(
    tracked: RedisCache, redis_client: aioredis.Redis
) -> None:
    presence = tracked.presence
    assert presence is not None
    await redis_client.set("someone-else:x:1", b"1")
    await redis_client.set(f"{PREFIX}-other:x:{'0' * 64}", b"1")
    assert await presence.caught_up()
    assert len(presence) == 0


async def test_too_many_keys_turn_the_mirror_off(
    tracked: RedisCache, other: RedisCache, clock: FakeClock
) -> None:
    presence = tracked.presence
    assert presence is not None
    presence._max_keys = 3
    for n in range(5):
        await other.set(key(n), value(clock))
    await eventually(lambda: presence.off_reason is not None, SETTLE)
    assert not presence.synced
    assert await tracked.get(key(4)) is not None  # asks Redis


async def test_without_tracking_support_it_stays_off(clock: FakeClock) -> None:
    client = fakeredis.aioredis.FakeRedis(server=fakeredis.FakeServer())
    cache = RedisCache(client, prefix=PREFIX, timeout=TIMEOUT, clock=clock, presence=True)
    assert cache.presence is not None
    try:
        await cache.start()
        await eventually(
            lambda: cache.presence is not None and cache.presence.off_reason is not None, SETTLE
        )
        stored = value(clock)
        await cache.set(key(1), stored)
        assert await cache.get(key(1)) == stored
        assert await cache.get(key(2)) is None
        assert cache.presence.skips == 0
    finally:
        await cache.aclose()


async def test_a_silent_server_never_syncs(silent_server: int, clock: FakeClock) -> None:
    cache = RedisCache(
        connect(f"redis://127.0.0.1:{silent_server}/0", timeout=0.2, max_connections=2),
        prefix=PREFIX, timeout=0.2, clock=clock, presence=True,
    )  # fmt: skip
    assert cache.presence is not None
    cache.presence._timeout = 0.2
    try:
        await cache.start()
        assert not await cache.presence.wait_synced(0.6)
        assert not cache.presence.absent(rkey(key(1)))
    finally:
        await asyncio.wait_for(cache.aclose(), 2.0)
