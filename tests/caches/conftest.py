"""Cache layers under test, each with the fake clock and a raw client for poking at the backend.

`l2` runs a test against RedisCache on fakeredis and on the private real redis-server; `layer`
runs it against every layer, RedisCache on the private Redis Cluster included. The real-server
variants carry the `redis` marker.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import fakeredis
import pytest
import redis.asyncio as aioredis

from caches.base import CacheLayer
from caches.memory import MemoryCache
from caches.redis_cache import RedisCache, connect
from tests.clock import FakeClock
from tests.rediscluster import RedisCluster
from tests.redisproc import RedisServer

PREFIX = "strata-test"
TIMEOUT = 0.5


@pytest.fixture
async def fake_redis() -> AsyncIterator[aioredis.Redis]:
    """A fakeredis client on its own private fake server (fakeredis shares one by default)."""
    client = fakeredis.aioredis.FakeRedis(server=fakeredis.FakeServer())
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def memory_layer(clock: FakeClock) -> MemoryCache:
    return MemoryCache(max_entries=1_000, max_bytes=8 * 1024 * 1024, clock=clock)


@pytest.fixture
async def fakeredis_layer(
    fake_redis: aioredis.Redis, clock: FakeClock
) -> AsyncIterator[RedisCache]:
    cache = RedisCache(fake_redis, prefix=PREFIX, timeout=TIMEOUT, clock=clock, owns_client=False)
    try:
        yield cache
    finally:
        await cache.aclose()


@pytest.fixture
async def redis_layer(
    redis_server: RedisServer, redis_client: aioredis.Redis, clock: FakeClock
) -> AsyncIterator[RedisCache]:
    """RedisCache on the real private server, through the production `connect`; the database is
    flushed first (by `redis_client`)."""
    client = connect(redis_server.url, timeout=TIMEOUT, max_connections=8)
    cache = RedisCache(client, prefix=PREFIX, timeout=TIMEOUT, clock=clock)
    try:
        yield cache
    finally:
        await cache.aclose()


@pytest.fixture
async def cluster_layer(redis_cluster: RedisCluster, clock: FakeClock) -> AsyncIterator[RedisCache]:
    """RedisCache on the private Redis Cluster (emptied first), through the production
    `connect`."""
    redis_cluster.flush()
    client = connect(redis_cluster.url, timeout=TIMEOUT, max_connections=8)
    cache = RedisCache(client, prefix=PREFIX, timeout=TIMEOUT, clock=clock)
    await cache.start()
    try:
        yield cache
    finally:
        await cache.aclose()


REDIS_BACKENDS = [
    pytest.param("fakeredis", id="fakeredis"),
    pytest.param("redis", id="redis", marks=pytest.mark.redis),
]


@pytest.fixture(params=REDIS_BACKENDS)
def l2(request: pytest.FixtureRequest) -> RedisCache:
    """RedisCache on each Redis backend."""
    layer: RedisCache = request.getfixturevalue(f"{request.param}_layer")
    return layer


@pytest.fixture
def raw_redis(l2: RedisCache) -> aioredis.Redis:
    """The client underneath `l2`, for writing and inspecting keys directly."""
    return l2.client


@pytest.fixture(
    params=[
        pytest.param("memory", id="memory"),
        *REDIS_BACKENDS,
        pytest.param("cluster", id="redis-cluster", marks=pytest.mark.redis),
    ]
)
def layer(request: pytest.FixtureRequest) -> CacheLayer:
    """Every cache layer."""
    found: CacheLayer = request.getfixturevalue(f"{request.param}_layer")
    return found


@pytest.fixture
async def silent_server() -> AsyncIterator[int]:
    """A TCP server that accepts connections and never answers: a hung Redis."""
    held: list[asyncio.StreamWriter] = []

    async def accept(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
