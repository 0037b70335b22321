"""Invalidation generations shared by replicas through a real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from caches.generations import Generations, field
from caches.redis_cache import connect
from tests.polling import eventually
from tests.redisproc import RedisServer

PREFIX = "gen-test"


@pytest.fixture
async def replicas(
    redis_server: RedisServer, redis_client: aioredis.Redis
) -> AsyncIterator[tuple[Generations, Generations]]:
    clients = [connect(redis_server.url, timeout=0.5, max_connections=16) for _ in range(2)]
    pair = [Generations(client, PREFIX, heartbeat=0.2) for client in clients]
    for generations in pair:
        await generations.start()
        assert await generations.wait_subscribed(2.0)
    try:
        yield pair[0], pair[1]
    finally:
        for generations in pair:
            await generations.aclose()
        for client in clients:
            await client.aclose()


def test_fields_name_their_scope() -> None:
    assert field("all") == "all"
    assert field("tenant", "acme") == "t:acme"
    assert field("model", "m:1") == "m:m:1"
    assert field("namespace", "docs") == "n:docs"
    with pytest.raises(ValueError, match="scope"):
        field("everything")


async def test_without_redis_generations_are_local() -> None:
    generations = Generations(None, PREFIX)
    await generations.start()
    assert generations.get("t:a") == 0
    assert await generations.bump("t:a") == 1
    assert await generations.bump("t:a") == 2
    assert generations.get("t:a") == 2
    dropped: list[str] = []
    generations.on_drop(dropped.append)
    await generations.drop("abc")
    assert dropped == ["abc"]


async def test_a_bump_on_one_replica_reaches_the_other(
    replicas: tuple[Generations, Generations],
) -> None:
    a, b = replicas
    assert await a.bump("t:acme") == 1
    assert a.get("t:acme") == 1  # at once, on the replica that bumped
    seconds = await eventually(lambda: b.get("t:acme") == 1)
    assert seconds < 1.0
    assert b.get("t:other") == 0


async def test_concurrent_bumps_are_never_lost(replicas: tuple[Generations, Generations]) -> None:
    a, b = replicas
    await asyncio.gather(*(g.bump("all") for g in (a, b) for _ in range(10)))
    await eventually(lambda: a.get("all") == b.get("all") == 20)


async def test_a_drop_reaches_every_replica(replicas: tuple[Generations, Generations]) -> None:
    a, b = replicas
    seen_a: list[str] = []
    seen_b: list[str] = []
    a.on_drop(seen_a.append)
    b.on_drop(seen_b.append)
    await a.drop("d1")
    assert seen_a == ["d1"]
    await eventually(lambda: seen_b == ["d1"])


async def test_a_new_replica_starts_with_the_stored_generations(
    redis_server: RedisServer, replicas: tuple[Generations, Generations]
) -> None:
    a, _ = replicas
    await a.bump("m:llama")
    await a.bump("m:llama")
    client = connect(redis_server.url, timeout=0.5, max_connections=2)
    late = Generations(client, PREFIX)
    try:
        await late.start()
        assert late.get("m:llama") == 2  # before its follower even subscribed
    finally:
        await late.aclose()
        await client.aclose()


async def test_bumps_missed_while_disconnected_are_read_on_reconnect(
    redis_client: aioredis.Redis, replicas: tuple[Generations, Generations]
) -> None:
    _, b = replicas
    reloads = b.reloads
    await redis_client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    # Written without an announcement, as if it happened while b was away.
    await redis_client.hincrby(f"{PREFIX}:gen", "n:docs", 5)
    await eventually(lambda: b.get("n:docs") == 5, timeout=5.0)
    assert b.reloads > reloads
    assert await b.wait_subscribed(5.0)


async def test_a_replica_never_goes_back_to_an_older_generation(
    redis_client: aioredis.Redis, replicas: tuple[Generations, Generations]
) -> None:
    a, b = replicas
    await a.bump("all")
    await eventually(lambda: b.get("all") == 1)
    await redis_client.delete(f"{PREFIX}:gen")  # e.g. a flushed or failed-over Redis
    await a.bump("t:x")  # makes every replica read the hash again
    await eventually(lambda: b.get("t:x") == 1)
    assert b.get("all") == 1
