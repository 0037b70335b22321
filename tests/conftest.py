"""Fixtures shared by every test package: a private Redis server (and a private Redis Cluster and
Sentinel setup), a client on it, a fake clock."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

import pytest
import redis.asyncio as aioredis

from tests.clock import FakeClock
from tests.rediscluster import RedisCluster
from tests.redisproc import INSTALL_HINT, RedisServer, RedisServerError, start_redis_server
from tests.redissentinel import RedisSentinel

T = TypeVar("T")


# Fixtures that start real redis-server processes.
REAL_REDIS = frozenset({"redis_server", "redis_cluster", "fresh_redis_cluster", "redis_sentinel"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Whatever uses a real server is a `redis` test, so `-m "not redis"` leaves it out.
    for item in items:
        if REAL_REDIS & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.redis)


def _started(make: Callable[[], T]) -> T:
    try:
        return make()
    except RedisServerError as exc:
        hint = "" if INSTALL_HINT in str(exc) else f"\n({INSTALL_HINT})"
        pytest.fail(f"cannot start the private Redis: {exc}{hint}", pytrace=False)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server for the whole session (see `tests.redisproc`).

    Tests that `stop()` it must `start()` it again (in a `finally`); `start()` is a no-op when it
    is already running.
    """
    server = _started(start_redis_server)
    try:
        yield server
    finally:
        server.close()


def _cluster() -> RedisCluster:
    cluster = RedisCluster()
    cluster.start()
    return cluster


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A private 3-master, 3-replica Redis Cluster for the session (`tests.rediscluster`), for
    tests that leave its nodes running; `flush()` it first."""
    cluster = _started(_cluster)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def fresh_redis_cluster() -> Iterator[RedisCluster]:
    """A cluster of the test's own, for tests that kill its nodes."""
    cluster = _started(_cluster)
    try:
        yield cluster
    finally:
        cluster.close()


def _sentinel() -> RedisSentinel:
    group = RedisSentinel()
    group.start()
    return group


@pytest.fixture
def redis_sentinel() -> Iterator[RedisSentinel]:
    """A master, its replica and a sentinel of the test's own (`tests.redissentinel`)."""
    group = _started(_sentinel)
    try:
        yield group
    finally:
        group.close()


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A client on the private server, with an empty database 0."""
    redis_server.start()  # in case an earlier test left it stopped
    client = aioredis.Redis(host="127.0.0.1", port=redis_server.port, db=0, socket_timeout=5)
    await client.flushdb()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
