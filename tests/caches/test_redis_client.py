"""The client factory: the right kind of client for each URL, bounded the same way; a cluster
client that does not re-read its slot map on every error; keyspace walks that visit every
primary of a cluster."""

from __future__ import annotations

import warnings
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.cluster import RedisCluster as ClusterClient
from redis.asyncio.sentinel import SentinelConnectionPool

from caches.redis_client import (
    SCAN_BATCH,
    Cluster,
    RedisClient,
    SentinelMaster,
    connect,
    ready,
    scan_batches,
    unlink_matching,
)
from tests.clock import FakeClock
from tests.rediscluster import RedisCluster

TIMEOUT = 0.25


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        pytest.param("redis://127.0.0.1:1/0", aioredis.Redis, id="single"),
        pytest.param("redis+cluster://127.0.0.1:1,127.0.0.1:2", Cluster, id="cluster"),
        pytest.param("redis+sentinel://127.0.0.1:1/strata/2", SentinelMaster, id="sentinel"),
    ],
)
async def test_connect_makes_the_kind_the_url_names_without_io_or_warnings(
    url: str, kind: type
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        client = connect(url, timeout=TIMEOUT, max_connections=3)  # nothing listens on 1 or 2
    try:
        assert type(client) is kind
    finally:
        await client.aclose()


async def test_a_cluster_client_is_bounded_by_the_timeout_per_node() -> None:
    client = connect("redis+cluster://u:pw@127.0.0.1:1", timeout=TIMEOUT, max_connections=3)
    assert isinstance(client, ClusterClient)
    try:
        kwargs = client.get_connection_kwargs()
        assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (TIMEOUT, TIMEOUT)
        assert (kwargs["max_connections"], kwargs["username"], kwargs["password"]) == (3, "u", "pw")
        assert client.retry.get_retries() == 1
        assert [(n.host, n.port) for n in client.startup_nodes] == [("127.0.0.1", 1)]
    finally:
        await client.aclose()


async def test_a_sentinel_client_bounds_the_sentinels_and_the_master() -> None:
    client = connect(
        "redis+sentinel://:pw@127.0.0.1:1,127.0.0.1:2/strata/2?sentinel_password=spw",
        timeout=TIMEOUT,
        max_connections=3,
    )
    try:
        pool = client.connection_pool
        assert isinstance(pool, SentinelConnectionPool)
        assert pool.service_name == "strata"
        kwargs = pool.connection_kwargs
        assert (kwargs["db"], kwargs["password"], kwargs["socket_timeout"]) == (2, "pw", TIMEOUT)
        assert pool.max_connections == 3
        sentinels = pool.sentinel_manager.sentinels
        assert len(sentinels) == 2
        for sentinel in sentinels:
            skw = sentinel.connection_pool.connection_kwargs
            assert (skw["socket_timeout"], skw["socket_connect_timeout"]) == (TIMEOUT, TIMEOUT)
            assert skw["password"] == "spw"
    finally:
        await client.aclose()


async def test_ready_does_nothing_for_a_single_server() -> None:
    client = connect("redis://127.0.0.1:1/0", timeout=TIMEOUT, max_connections=1)
    try:
        await ready(client, TIMEOUT)  # no I/O: a single server has no slot map
    finally:
        await client.aclose()


async def test_ready_on_an_unreachable_cluster_raises_within_its_bound() -> None:
    client = connect("redis+cluster://127.0.0.1:1", timeout=TIMEOUT, max_connections=1)
    try:
        with pytest.raises(Exception, match="Redis Cluster cannot be connected"):
            await ready(client, 5.0)
    finally:
        await client.aclose()


# --- walking a cluster's keyspace -------------------------------------------------------------


@pytest.fixture
async def cluster_client(redis_cluster: RedisCluster) -> AsyncIterator[RedisClient]:
    redis_cluster.flush()
    client = connect(redis_cluster.url, timeout=1.0, max_connections=4)
    await ready(client, 5.0)
    try:
        yield client
    finally:
        await client.aclose()


async def test_scan_and_unlink_cover_every_primary(cluster_client: RedisClient) -> None:
    assert isinstance(cluster_client, ClusterClient)
    count = SCAN_BATCH + 500
    names = [f"walk:{n}" for n in range(count)]
    async with cluster_client.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.set(name, b"x")
        pipe.set("other:1", b"keep")
        await pipe.execute()
    holders = {cluster_client.get_node_from_key(name).name for name in names}
    assert len(holders) == 3  # the keys really are spread over the three masters

    seen: list[bytes | str] = []
    async for batch in scan_batches(cluster_client, "walk:*", count=200):
        seen.extend(batch)
    assert sorted(k.decode() if isinstance(k, bytes) else k for k in seen) == sorted(names)

    assert await unlink_matching(cluster_client, "walk:*") == count
    assert [k async for k in scan_batches(cluster_client, "walk:*")] == []
    assert await cluster_client.get("other:1") == b"keep"


# --- how often a cluster client reads the slot map ---------------------------------------------


async def calls(cluster: RedisCluster, command: str) -> int:
    """How many times every node together has answered `command` (INFO commandstats name)."""
    total = 0
    for node in cluster.nodes:
        plain = aioredis.Redis(port=node.port, socket_timeout=1.0)
        try:
            stats = await plain.info("commandstats")
        finally:
            await plain.aclose()
        total += int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))
    return total


async def slot_map_reads(cluster: RedisCluster) -> int:
    return await calls(cluster, "cluster|slots")


async def test_a_stale_slot_map_is_read_again_at_most_once_per_refresh(
    redis_cluster: RedisCluster, clock: FakeClock
) -> None:
    client = Cluster(
        startup_nodes=[ClusterNode("127.0.0.1", redis_cluster.nodes[0].port)],
        refresh=0.5,
        clock=clock,
    )
    try:
        await client.set("refresh:k", b"v")  # the first use reads the map
        reads = await slot_map_reads(redis_cluster)
        for _ in range(5):
            client._initialize = True  # as after a connection error or a timeout
            assert await client.get("refresh:k") == b"v"
        assert await slot_map_reads(redis_cluster) == reads  # still within the refresh
        commands = await calls(redis_cluster, "command")
        clock.advance(0.5)
        client._initialize = True
        assert await client.get("refresh:k") == b"v"
        assert await slot_map_reads(redis_cluster) == reads + 1
        assert await calls(redis_cluster, "command") == commands  # its table is read once
    finally:
        await client.aclose()


async def test_a_dropped_slot_map_is_read_at_once(
    redis_cluster: RedisCluster, clock: FakeClock
) -> None:
    client = Cluster(
        startup_nodes=[ClusterNode("127.0.0.1", redis_cluster.nodes[0].port)],
        refresh=0.5,
        clock=clock,
    )
    try:
        await client.set("refresh:k", b"v")
        reads = await slot_map_reads(redis_cluster)
        await client.aclose()  # what redis-py does on CLUSTERDOWN: the nodes are dropped
        assert await client.get("refresh:k") == b"v"
        assert await slot_map_reads(redis_cluster) == reads + 1
    finally:
        await client.aclose()


async def test_closing_a_client_whose_map_is_stale_closes_its_connections(
    redis_cluster: RedisCluster,
) -> None:
    client = connect(redis_cluster.url, timeout=1.0, max_connections=2)
    assert isinstance(client, Cluster)
    await client.set("close:k", b"v")
    manager = client.nodes_manager
    nodes = [*manager.nodes_cache.values(), *manager.startup_nodes.values()]
    client._initialize = True  # as after a connection error or a timeout
    await client.aclose()
    assert not any(conn.is_connected for node in nodes for conn in node._connections)
