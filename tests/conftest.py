"""Fixtures shared by every test package: a private Redis server, a client on it, a fake clock."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from tests.clock import FakeClock
from tests.redisproc import INSTALL_HINT, RedisServer, RedisServerError, start_redis_server


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Whatever uses the real server is a `redis` test, so `-m "not redis"` leaves it out.
    for item in items:
        if "redis_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.redis)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server for the whole session (see `tests.redisproc`).

    Tests that `stop()` it must `start()` it again (in a `finally`); `start()` is a no-op when it
    is already running.
    """
    try:
        server = start_redis_server()
    except RedisServerError as exc:
        hint = "" if INSTALL_HINT in str(exc) else f"\n({INSTALL_HINT})"
        pytest.fail(f"cannot start the private redis-server: {exc}{hint}", pytrace=False)
    try:
        yield server
    finally:
        server.close()


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
