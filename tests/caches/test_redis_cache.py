"""L2 specifics: the Redis key layout and TTL, unreadable values, prefix isolation, and a Redis that
goes away (refused, restarted, or silent)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from caches.base import CachedResponse, CacheKey
from caches.codec import FORMAT_VERSION, decode, encode
from caches.redis_cache import SCAN_BATCH, RedisCache, connect
from tests.caches.conftest import PREFIX, TIMEOUT
from tests.clock import FakeClock
from tests.redisproc import RedisServer

ROUTE = "/v1/chat/completions"
# "Does not hang": far above the layer's timeout, far below anything a person would wait for.
NO_HANG = 2.0


def key(n: int, *, tenant: str = "t1") -> CacheKey:
    return CacheKey(digest=f"{n:064x}", tenant=tenant, model="m1", route=ROUTE)


def rkey(k: CacheKey, prefix: str = PREFIX) -> str:
    return f"{prefix}:x:{k.digest}"


def value(
    clock: FakeClock, body: bytes = b'{"choices":[]}', *, ttl: float = 60.0
) -> CachedResponse:
    return CachedResponse(body=body, created_at=clock.now, expires_at=clock.now + ttl)


def record(k: CacheKey, stored: CachedResponse, **changes: Any) -> bytes:
    rec = msgpack.unpackb(encode(k, stored), raw=False)
    rec.update(changes)
    packed: bytes = msgpack.packb(rec, use_bin_type=True)
    return packed


async def test_connect_builds_a_client_without_deprecation_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        client = connect("redis://127.0.0.1:1/0", timeout=TIMEOUT, max_connections=2)
    try:
        assert client.auto_close_connection_pool is True  # the client owns (and closes) its pool
    finally:
        await client.aclose()


# --- layout and TTL ---------------------------------------------------------------------------


async def test_entry_is_one_string_at_prefix_x_digest(
    l2: RedisCache, raw_redis: aioredis.Redis, clock: FakeClock
) -> None:
    stored = value(clock)
    await l2.set(key(1), stored)
    assert await raw_redis.keys("*") == [rkey(key(1)).encode()]
    data = await raw_redis.get(rkey(key(1)))
    assert isinstance(data, bytes)
    assert decode(key(1), data) == stored


@pytest.mark.parametrize(
    ("ttl", "expected"),
    [
        pytest.param(100.0, 100, id="whole-seconds"),
        pytest.param(0.2, 1, id="fraction-rounds-up"),
        pytest.param(3600.5, 3601, id="hour-and-a-half-second"),
    ],
)
async def test_redis_key_expires_with_the_value(
    l2: RedisCache, raw_redis: aioredis.Redis, clock: FakeClock, ttl: float, expected: int
) -> None:
    await l2.set(key(1), value(clock, ttl=ttl))
    remaining = await raw_redis.ttl(rkey(key(1)))
    assert 0 < remaining <= expected


async def test_value_expired_when_set_is_not_written(
    l2: RedisCache, raw_redis: aioredis.Redis, clock: FakeClock
) -> None:
    stale = value(clock, ttl=5)
    clock.advance(5)
    await l2.set(key(1), stale)
    assert await raw_redis.exists(rkey(key(1))) == 0


async def test_value_expired_by_the_clock_is_a_miss_while_redis_still_holds_it(
    l2: RedisCache, raw_redis: aioredis.Redis, clock: FakeClock
) -> None:
    await l2.set(key(1), value(clock, ttl=30))
    clock.advance(31)
    assert await l2.get(key(1)) is None
    assert l2.corrupt == 0


# --- unreadable values --------------------------------------------------------------------------

OTHER_TENANT = dataclasses.replace(key(1), tenant="t2")
SOME_VALUE = CachedResponse(body=b"{}", created_at=1_700_000_000.0, expires_at=1_700_000_060.0)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"garbage", id="garbage"),
        pytest.param(b"\xc1\x00\xff", id="invalid-msgpack"),
        pytest.param(b"", id="empty"),
        pytest.param(msgpack.packb([1, 2, 3]), id="msgpack-array"),
        pytest.param(b'{"v": 1, "b": "{}"}', id="json"),
        pytest.param(record(key(1), SOME_VALUE, v=FORMAT_VERSION + 1), id="foreign-version"),
        pytest.param(encode(OTHER_TENANT, SOME_VALUE), id="other-tenant-same-digest"),
        pytest.param(record(key(1), SOME_VALUE, d="f" * 64), id="other-digest"),
        pytest.param(record(key(1), SOME_VALUE, p="12"), id="wrong-type"),
        pytest.param(record(key(1), SOME_VALUE, o=True), id="bool-for-int"),
    ],
)
async def test_unreadable_value_is_a_miss_and_is_deleted(
    l2: RedisCache,
    raw_redis: aioredis.Redis,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
    data: bytes,
) -> None:
    clock.now = SOME_VALUE.created_at + 1
    await raw_redis.set(rkey(key(1)), data, ex=600)
    with caplog.at_level(logging.WARNING, logger="caches.redis_cache"):
        assert await l2.get(key(1)) is None
    assert await raw_redis.exists(rkey(key(1))) == 0
    assert l2.corrupt == 1
    assert "dropping unreadable entry" in caplog.text
    # The key is usable again straight away.
    fresh = value(clock)
    await l2.set(key(1), fresh)
    assert await l2.get(key(1)) == fresh


async def test_readable_neighbour_is_untouched_by_a_corrupt_entry(
    l2: RedisCache, raw_redis: aioredis.Redis, clock: FakeClock
) -> None:
    good = value(clock)
    await l2.set(key(2), good)
    await raw_redis.set(rkey(key(1)), b"garbage")
    assert await l2.get(key(1)) is None
    assert await l2.get(key(2)) == good


async def test_value_of_another_redis_type_is_a_miss_and_is_deleted(
    l2: RedisCache, raw_redis: aioredis.Redis
) -> None:
    await raw_redis.rpush(rkey(key(1)), b"x")
    assert await l2.get(key(1)) is None
    assert await raw_redis.exists(rkey(key(1))) == 0


# --- prefix isolation, SCAN-based clear and stats -----------------------------------------------


async def test_clear_and_stats_see_only_this_prefix(
    l2: RedisCache, raw_redis: aioredis.Redis, clock: FakeClock
) -> None:
    neighbour = RedisCache(
        raw_redis, prefix="other", timeout=TIMEOUT, clock=clock, owns_client=False
    )
    foreign = {
        "unrelated": b"1",
        f"{PREFIX}:y:{key(1).digest}": b"2",  # same prefix, another namespace
        f"{PREFIX}ing:x:{key(1).digest}": b"3",  # a prefix that merely starts with ours
        f"{PREFIX}:x": b"4",  # no digest
    }
    for name, data in foreign.items():
        await raw_redis.set(name, data)
    for n in range(3):
        await l2.set(key(n), value(clock))
    await neighbour.set(key(0), value(clock))

    stats = await l2.stats()
    assert stats.entries == 3
    assert await l2.clear() == 3

    assert await l2.stats() == dataclasses.replace(stats, entries=0, bytes=0)
    for name, data in foreign.items():
        assert await raw_redis.get(name) == data
    assert await neighbour.get(key(0)) is not None


async def test_stats_bytes_are_the_stored_record_sizes(
    l2: RedisCache, raw_redis: aioredis.Redis, clock: FakeClock
) -> None:
    values = {key(n): value(clock, b"z" * (10 * n)) for n in range(4)}
    for k, v in values.items():
        await l2.set(k, v)
    stats = await l2.stats()
    assert stats.layer == "l2"
    assert stats.entries == 4
    assert stats.bytes == sum(len(encode(k, v)) for k, v in values.items())


async def test_clear_and_stats_walk_more_than_one_scan_batch(
    l2: RedisCache, raw_redis: aioredis.Redis, clock: FakeClock
) -> None:
    count = 2 * SCAN_BATCH + 7
    v = value(clock, b"")
    async with raw_redis.pipeline(transaction=False) as pipe:
        for n in range(count):
            pipe.set(rkey(key(n)), encode(key(n), v), ex=600)
        await pipe.execute()
    await raw_redis.set("unrelated", b"keep")
    assert (await l2.stats()).entries == count
    assert await l2.clear() == count
    assert await raw_redis.dbsize() == 1


async def test_aclose_leaves_a_borrowed_client_open(
    fake_redis: aioredis.Redis, clock: FakeClock
) -> None:
    cache = RedisCache(fake_redis, prefix=PREFIX, timeout=TIMEOUT, clock=clock, owns_client=False)
    await cache.aclose()
    assert await fake_redis.ping() is True


# --- a Redis that goes away ---------------------------------------------------------------------


@pytest.fixture
def stopped_redis(redis_server: RedisServer) -> Iterator[RedisServer]:
    """The private server, stopped for the test and started again (same port) afterwards."""
    redis_server.stop()
    yield redis_server
    redis_server.start()


@pytest.mark.redis
async def test_down_redis_raises_promptly(
    redis_layer: RedisCache, stopped_redis: RedisServer, clock: FakeClock
) -> None:
    with pytest.raises(RedisConnectionError):
        await asyncio.wait_for(redis_layer.get(key(1)), NO_HANG)
    with pytest.raises(RedisConnectionError):
        await asyncio.wait_for(redis_layer.set(key(1), value(clock)), NO_HANG)
    assert await asyncio.wait_for(redis_layer.ping(), NO_HANG) is False


@pytest.mark.redis
async def test_works_again_after_a_restart_without_a_new_client(
    redis_layer: RedisCache, redis_server: RedisServer, clock: FakeClock
) -> None:
    before = value(clock, b"before")
    await redis_layer.set(key(1), before)
    assert await redis_layer.get(key(1)) == before

    redis_server.stop()
    try:
        with pytest.raises(RedisError):
            await asyncio.wait_for(redis_layer.get(key(1)), NO_HANG)
    finally:
        redis_server.start()

    # The pool's connections died with the server; within a few calls it reconnects by itself.
    for _attempt in range(3):
        try:
            # Nothing is persisted: the old entry is gone.
            assert await asyncio.wait_for(redis_layer.get(key(1)), NO_HANG) is None
            break
        except (RedisConnectionError, RedisTimeoutError):
            continue
    else:
        pytest.fail("RedisCache did not recover within 3 calls after the server restarted")
    after = value(clock, b"after")
    await redis_layer.set(key(1), after)
    assert await redis_layer.get(key(1)) == after
    assert await redis_layer.ping() is True


async def test_silent_redis_is_cut_by_the_socket_timeout(
    silent_server: int, clock: FakeClock
) -> None:
    client = connect(f"redis://127.0.0.1:{silent_server}/0", timeout=0.2, max_connections=2)
    cache = RedisCache(client, prefix=PREFIX, timeout=0.2, clock=clock)
    try:
        with pytest.raises(RedisTimeoutError):
            await asyncio.wait_for(cache.get(key(1)), NO_HANG)
        assert await asyncio.wait_for(cache.ping(), NO_HANG) is False
    finally:
        await cache.aclose()
