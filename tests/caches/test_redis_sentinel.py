"""L2 behind a real Sentinel: it works through the `redis+sentinel://` URL, and when the master
dies (SIGKILL) or hands over (SENTINEL FAILOVER), lookups follow the promoted replica and the
key-presence mirror re-syncs on it; the generations and L3's store work through it too. The
failover test prints its figures as one JSON line."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest
import redis
from redis.asyncio.sentinel import SentinelConnectionPool

from caches.generations import Generations, field
from caches.redis_cache import RedisCache, connect
from caches.semantic_scope import SemanticScope
from caches.semantic_store import SemanticStore
from tests.caches.test_redis_cache import key, value
from tests.caches.test_semantic import DIM, Factory, answer, factory
from tests.caches.test_semantic import key as entry_key
from tests.clock import FakeClock
from tests.polling import eventually
from tests.redissentinel import RedisSentinel

__all__ = ["factory"]  # the semantic tests' fixture, used here too

TIMEOUT = 0.5  # generous: this machine may be busy, and a timeout here is not what is tested
SETTLE = 10.0  # seconds a failover and a re-sync may take here; they take about 3 to 5


@pytest.fixture
async def tracked(redis_sentinel: RedisSentinel, clock: FakeClock) -> AsyncIterator[RedisCache]:
    """L2 through the sentinel URL with its key-presence mirror on, synced; retries and
    heartbeats shortened so that a failover is followed within a test."""
    client = connect(redis_sentinel.url, timeout=TIMEOUT, max_connections=8)
    cache = RedisCache(client, prefix="sen", timeout=TIMEOUT, clock=clock, presence=True)
    assert cache.presence is not None
    cache.presence._retry_delay = (0.05, 0.2)
    cache.presence._heartbeat = 0.3
    await cache.start()
    assert await cache.presence.wait_synced(SETTLE)
    try:
        yield cache
    finally:
        await cache.aclose()


def tracked_port(cache: RedisCache) -> int | None:
    conn = cache.presence._conn if cache.presence is not None else None
    return getattr(conn, "port", None)


async def test_l2_works_through_the_sentinel_url(
    tracked: RedisCache, redis_sentinel: RedisSentinel, clock: FakeClock
) -> None:
    assert isinstance(tracked.client.connection_pool, SentinelConnectionPool)
    assert tracked_port(tracked) == redis_sentinel.master.port
    assert await tracked.get(key(1)) is None  # answered by the mirror
    stored = value(clock, b"through the sentinel")
    await tracked.set(key(1), stored)
    assert await tracked.get(key(1)) == stored
    with redis.Redis(port=redis_sentinel.master.port, socket_timeout=2) as direct:
        assert direct.exists(f"sen:x:{key(1).digest}") == 1


async def test_after_the_master_is_killed_hits_resume_on_the_promoted_replica(
    tracked: RedisCache, redis_sentinel: RedisSentinel, clock: FakeClock
) -> None:
    stored = value(clock, b"before the failover")
    await tracked.set(key(1), stored)
    await asyncio.to_thread(redis_sentinel.wait_replicated)  # the replica has it

    lookups = errors = 0
    resumed: float | None = None

    async def look() -> None:
        nonlocal lookups, errors, resumed
        while resumed is None:
            lookups += 1
            try:
                async with asyncio.timeout(TIMEOUT):
                    hit = await tracked.get(key(1))
            except Exception:
                errors += 1  # the chain counts these as misses
            else:
                if hit == stored:
                    resumed = time.perf_counter()
            await asyncio.sleep(0.02)

    killed = time.perf_counter()
    redis_sentinel.kill_master()
    looking = asyncio.create_task(look())
    failover = await asyncio.to_thread(redis_sentinel.wait_failover, SETTLE)
    await asyncio.wait_for(looking, SETTLE)
    assert resumed is not None
    assert errors > 0  # the dead master did fail lookups, as misses
    assert tracked.presence is not None
    assert await tracked.presence.wait_synced(SETTLE)
    await eventually(lambda: tracked_port(tracked) == redis_sentinel.replica.port, SETTLE)
    print(
        json.dumps({
            "test": "sentinel_master_killed",
            "down_after_ms": 1000,
            "failover_s": round(failover, 2),
            "l2_hits_resumed_after_s": round(resumed - killed, 2),
            "lookups": lookups,
            "failed_lookups_as_misses": errors,
        })
    )  # fmt: skip


async def test_a_handover_moves_the_mirror_to_the_new_master(
    tracked: RedisCache, redis_sentinel: RedisSentinel, clock: FakeClock
) -> None:
    """The old master stays up (now a replica): the mirror must not keep following it."""
    with redis.Redis(port=redis_sentinel.sentinel.port, socket_timeout=2) as sentinel:
        sentinel.execute_command("SENTINEL", "FAILOVER", redis_sentinel.service)
    await asyncio.to_thread(redis_sentinel.wait_failover, SETTLE)
    await eventually(lambda: tracked_port(tracked) == redis_sentinel.replica.port, SETTLE)
    assert tracked.presence is not None
    assert await tracked.presence.wait_synced(SETTLE)
    # Written on the new master by another replica: the mirror must not call it absent.
    other = RedisCache(
        connect(redis_sentinel.url, timeout=TIMEOUT, max_connections=2),
        prefix="sen", timeout=TIMEOUT, clock=clock,
    )  # fmt: skip
    try:
        stored = value(clock, b"after the handover")
        await eventually(lambda: _stored(other, stored), SETTLE)
        assert await tracked.presence.caught_up()
        assert await tracked.get(key(7)) == stored
    finally:
        await other.aclose()


async def _stored(cache: RedisCache, stored: object) -> bool:
    """One write of `stored` at key 7; False while the client still finds no master."""
    try:
        await cache.set(key(7), stored)  # type: ignore[arg-type]
    except Exception:
        return False
    return True


async def test_generations_and_the_semantic_store_work_through_the_sentinel_url(
    redis_sentinel: RedisSentinel, factory: Factory, clock: FakeClock
) -> None:
    url = redis_sentinel.url
    clients = [connect(url, timeout=TIMEOUT, max_connections=4) for _ in range(2)]
    a, b = (Generations(client, "sen", heartbeat=0.2) for client in clients)
    try:
        for one in (a, b):
            await one.start()
            assert await one.wait_subscribed(SETTLE)
        assert await a.bump(field("model", "m1")) == 1
        await eventually(lambda: b.get("m:m1") == 1, timeout=2.0)
    finally:
        for one in (a, b):
            await one.aclose()
        for client in clients:
            await client.aclose()

    def store() -> SemanticStore:
        return SemanticStore(
            connect(url, timeout=TIMEOUT, max_connections=4),
            connect(url, timeout=5.0, max_connections=2),
            prefix="sen",
            dimension=DIM,
        )

    first, second = factory(store=store()), factory(store=store())
    await first.start()
    await second.start()
    await first.store(SemanticScope("p", "how do i reset my password"), entry_key(1),
                      answer(clock), None)  # fmt: skip
    await eventually(lambda: second.size == 1, timeout=2.0)
