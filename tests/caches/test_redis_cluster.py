"""Every Redis user on a real 3-master Redis Cluster: L2 (its contract runs there too, see
`tests.caches.conftest`), the semantic store and the invalidation generations, each shared by
two replicas. Killing masters is `tests.faults.test_redis_cluster_failover`'s business."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pytest
from redis.asyncio.cluster import RedisCluster as ClusterClient

from caches.generations import Generations, field
from caches.redis_cache import RedisCache, connect
from caches.semantic_scope import SemanticScope
from caches.semantic_store import SemanticStore
from tests.caches.test_redis_cache import key, rkey, value
from tests.caches.test_semantic import DIM, Factory, answer, factory
from tests.caches.test_semantic import key as entry_key
from tests.clock import FakeClock
from tests.polling import eventually
from tests.rediscluster import RedisCluster

__all__ = ["factory"]  # the semantic tests' fixture, used here too

TIMEOUT = 0.5


@pytest.fixture
def cluster(redis_cluster: RedisCluster) -> RedisCluster:
    redis_cluster.flush()
    return redis_cluster


def l2(cluster: RedisCluster, clock: FakeClock, *, presence: bool = False) -> RedisCache:
    client = connect(cluster.url, timeout=TIMEOUT, max_connections=4)
    return RedisCache(client, prefix="l2c", timeout=TIMEOUT, clock=clock, presence=presence)


async def test_l2_entries_spread_over_every_master_and_are_shared(
    cluster: RedisCluster, clock: FakeClock
) -> None:
    a, b = l2(cluster, clock), l2(cluster, clock)
    try:
        await a.start()
        await b.start()
        for n in range(30):
            await a.set(key(n), value(clock, f"answer {n}".encode()))
        for n in range(30):
            hit = await b.get(key(n))
            assert hit is not None
            assert hit.body == f"answer {n}".encode()
        client = a.client
        assert isinstance(client, ClusterClient)
        # No hash tags: entries land wherever their own key hashes.
        owners = {client.get_node_from_key(rkey(key(n), "l2c")).name for n in range(30)}
        assert len(owners) == 3
        assert (await b.stats()).entries == 30
        assert await b.clear() == 30
        assert await a.get(key(1)) is None
    finally:
        await a.aclose()
        await b.aclose()


async def test_l2_key_presence_is_off_on_a_cluster_and_says_so(
    cluster: RedisCluster, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="caches.redis_cache"):
        cache = l2(cluster, clock, presence=True)
    try:
        assert cache.presence is None
        assert "key presence off: Redis Cluster" in caplog.text
        await cache.start()
        assert cache.known_absent(key(1)) is False  # never claims absence: it asks Redis
        await cache.set(key(1), value(clock))
        assert await cache.get(key(1)) is not None
    finally:
        await cache.aclose()


# --- L3's store -------------------------------------------------------------------------------


def store(cluster: RedisCluster, prefix: str) -> SemanticStore:
    return SemanticStore(
        connect(cluster.url, timeout=TIMEOUT, max_connections=4),
        connect(cluster.url, timeout=5.0, max_connections=2),
        prefix=prefix,
        dimension=DIM,
    )


async def test_semantic_entries_are_shared_loaded_and_cleared_across_masters(
    cluster: RedisCluster, factory: Factory, clock: FakeClock
) -> None:
    a = factory(store=store(cluster, "l3c"))
    b = factory(store=store(cluster, "l3c"))
    await a.start()
    await b.start()
    questions = [f"how do i reset password number {n}" for n in range(12)]
    for n, question in enumerate(questions):
        await a.store(SemanticScope("p", question), entry_key(n), answer(clock, f"a{n}"), None)

    async def on_b() -> bool:
        found = await b.lookup(SemanticScope("p", "number 11 password reset how do i"))
        return found[0] is not None

    await eventually(on_b, timeout=2.0)

    later = factory(store=store(cluster, "l3c"))  # a replica started now loads them all
    await later.start()
    assert later.size == len(questions)

    assert await a.clear() == len(questions)
    empty = factory(store=store(cluster, "l3c"))
    await empty.start()
    assert empty.size == 0


async def test_the_store_fetches_its_writers_slot_map_at_start(cluster: RedisCluster) -> None:
    one = store(cluster, "l3ready")
    try:
        writer = one._redis
        assert isinstance(writer, ClusterClient)
        assert writer._initialize  # nothing fetched yet
        await one.ready()
        assert not writer._initialize  # the first write will not have to, under its timeout
    finally:
        await one.aclose()


# --- invalidation generations -----------------------------------------------------------------


@pytest.fixture
async def generations(cluster: RedisCluster) -> AsyncIterator[tuple[Generations, Generations]]:
    clients = [connect(cluster.url, timeout=TIMEOUT, max_connections=8) for _ in range(2)]
    pair = [Generations(client, "genc", heartbeat=0.2) for client in clients]
    for one in pair:
        await one.start()
        assert await one.wait_subscribed(5.0)
    try:
        yield pair[0], pair[1]
    finally:
        for one in pair:
            await one.aclose()
        for client in clients:
            await client.aclose()


async def test_a_bump_and_a_drop_reach_the_other_replica(
    generations: tuple[Generations, Generations],
) -> None:
    a, b = generations
    assert await a.bump(field("tenant", "acme")) == 1
    await eventually(lambda: b.get("t:acme") == 1, timeout=2.0)
    dropped: list[str] = []
    b.on_drop(dropped.append)
    await a.drop("f" * 64)
    await eventually(lambda: dropped == ["f" * 64], timeout=2.0)
