"""Redis clients for every topology a URL can name (see `config.redis_url`), and the keyspace
walks that must visit every node holding keys.

Guarantees:
- `connect` returns a client for one server (`redis.asyncio.Redis`), for a Redis Cluster
  (`redis.asyncio.RedisCluster`) or for the master a Sentinel watches (a `Redis` whose pool
  asks the sentinels where the master is before it connects). Each wait is bounded by
  `timeout`: connecting and reading, to nodes and sentinels alike. A connection that breaks is
  retried once at once (on a cluster: after reading the slot map again). `aclose()` releases
  everything, the sentinel connections included.
- Failover. Cluster: a connection error or timeout marks the slot map stale and a later
  command reads it again (CLUSTER SLOTS; at most every `SLOT_MAP_REFRESH` seconds) before it
  runs; MOVED redirects patch it — so the client follows a promoted replica by itself, and
  until the promotion the dead master's slots fail fast (a miss for the layer, counted by its
  breaker). Sentinel: a broken connection reconnects to the address the sentinels name now; a
  connection to a demoted master answers READONLY, which drops it.
- `scan_batches` and `unlink_matching` walk with SCAN (never KEYS): on a cluster every primary,
  one node at a time (cursors are per node), otherwise the one server. UNLINK of a batch is
  split by hash slot on a cluster.
- `ready` fetches a cluster's slot map ahead of the first command, so that it is not fetched
  under the first lookups' short deadlines; elsewhere it does nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeAlias

import redis.asyncio as aioredis
from redis._parsers.commands import AsyncCommandsParser
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from config.redis_url import TLS_OPTIONS, RedisTarget, parse_redis_url

RedisClient: TypeAlias = aioredis.Redis | RedisCluster

SCAN_BATCH = 1000
# Seconds between two reads of a cluster's slot map after errors (see `Cluster`): each read
# costs ~5-20 ms of the event loop; 0.5 s between them still doubled a replica's CPU during a
# master's outage. A promoted replica is used at most this much later than it could be.
SLOT_MAP_REFRESH = 1.0


class SentinelMaster(aioredis.Redis):
    """The master a Sentinel watches: closing it closes the sentinel connections too (redis-py
    leaves those to whoever made the `Sentinel`, and here that is `connect`)."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            pool = self.connection_pool
            if isinstance(pool, SentinelConnectionPool):
                await pool.sentinel_manager.aclose()


class _CommandTable(AsyncCommandsParser):
    """redis-py's table of where each command's keys are (COMMAND), fetched once: redis-py
    fetches it again with every slot map and parses it on the event loop, though it cannot
    change while the servers run. The node it asks about commands with keys in odd places
    (XREAD) still follows every read of the map."""

    async def initialize(self, node: ClusterNode | None = None) -> None:
        if node is not None:
            self.node = node
        if not self.commands:
            await super().initialize(node)


class Cluster(RedisCluster):
    """redis-py's cluster client, reading the slot map again at most every `refresh` seconds.

    redis-py reads it again (CLUSTER SLOTS, then COMMAND: ~5-10 ms of this event loop, and
    every pooled connection reconnects) before the next command after any connection error or
    timeout. While a master is down that is before nearly every command, in every client, and
    the loop stalled for hundreds of milliseconds; between reads, commands for the dead
    master's slots fail at once instead. A client that never read the map, or dropped it
    (CLUSTERDOWN), reads it at once. COMMAND is read once (`_CommandTable`).
    """

    def __init__(
        self,
        *args: Any,
        refresh: float,
        clock: Callable[[], float] = time.monotonic,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.commands_parser = _CommandTable()
        self._refresh = refresh
        self._clock = clock
        self._read_at: float | None = None

    async def initialize(self, *args: Any, **kwargs: Any) -> RedisCluster:
        read_at = self._read_at
        if (
            self._initialize
            and read_at is not None
            and self.nodes_manager.default_node is not None
            and self._clock() - read_at < self._refresh
        ):
            return self  # the map it has, until it may read again
        cluster = await super().initialize(*args, **kwargs)
        if not self._initialize:
            self._read_at = self._clock()
        return cluster

    async def aclose(self) -> None:
        if self._initialize:
            # Marked stale (after an error, until the next read), redis-py's aclose closes
            # nothing, and a shutdown would leave the node connections open. Only idle ones
            # are closed here: redis-py also calls aclose itself, as a reset, under load.
            manager = self.nodes_manager
            # The startup nodes are objects of their own (equal by address to the others), with
            # the connections the slot-map reads used.
            nodes = [*manager.nodes_cache.values(), *manager.startup_nodes.values()]
            await asyncio.gather(*(node.disconnect_free_connections() for node in nodes))
        await super().aclose()


def connect(url: str, *, timeout: float, max_connections: int) -> RedisClient:
    """A pooled client for `url` whose every wait is bounded by `timeout` seconds (see the
    module). On a cluster, `max_connections` is per node."""
    target = parse_redis_url(url)
    common: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "health_check_interval": 0,
    }
    if target.kind == "cluster":
        return _cluster(target, common, max_connections)
    if target.kind == "sentinel":
        return _sentinel_master(target, common, max_connections)
    # A plain pool: the blocking one's condition and timer cost ~10% of an L2 hit. Past
    # `max_connections` concurrent commands a lookup fails at once and counts as a miss.
    pool = aioredis.ConnectionPool.from_url(
        url,
        max_connections=max_connections,
        # One immediate retry replaces a pooled connection that died with a restarted server.
        retry=Retry(NoBackoff(), 1),
        retry_on_error=[RedisConnectionError],
        **common,
    )
    # `from_pool`: the client owns the pool and closes it on `aclose()`.
    return aioredis.Redis.from_pool(pool)


def _tls(target: RedisTarget) -> dict[str, Any]:
    """redis-py's TLS arguments for the URL's TLS options (none without a rediss+ scheme)."""
    if not target.tls:
        return {}
    return {"ssl": True, **{k: v for k, v in target.options.items() if k in TLS_OPTIONS}}


def _cluster(target: RedisTarget, common: dict[str, Any], max_connections: int) -> Cluster:
    return Cluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
        username=target.username,
        password=target.password,
        max_connections=max_connections,
        # Counted at the cluster level: on a connection error or timeout the slot map is read
        # again, then the command is tried once more.
        retry=Retry(NoBackoff(), 1),
        # Serve the slots that are covered while others are not (a master down, no replica):
        # whether a partly covered cluster answers is the servers' own setting to decide.
        require_full_coverage=False,
        refresh=SLOT_MAP_REFRESH,
        **common,
        **_tls(target),
    )


def _sentinel_master(
    target: RedisTarget, common: dict[str, Any], max_connections: int
) -> SentinelMaster:
    assert target.service is not None
    tls = _tls(target)
    sentinel_auth = {
        "username": target.options.get("sentinel_username"),
        "password": target.options.get("sentinel_password"),
    }
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(target.nodes),
        sentinel_kwargs={**common, **tls, **sentinel_auth},
    )
    master: SentinelMaster = sentinel.master_for(
        target.service,
        redis_class=SentinelMaster,
        db=target.db,
        username=target.username,
        password=target.password,
        max_connections=max_connections,
        retry=Retry(NoBackoff(), 1),
        retry_on_error=[RedisConnectionError],
        **common,
        **tls,
    )
    return master


async def ready(client: RedisClient, timeout: float) -> None:  # noqa: ASYNC109
    """Fetch a cluster's slot map now (bounded by `timeout`); raises what the fetch raised."""
    if isinstance(client, RedisCluster):
        async with asyncio.timeout(timeout):
            await client.initialize()


async def scan_batches(
    client: RedisClient, match: str, count: int = SCAN_BATCH
) -> AsyncIterator[list[bytes | str]]:
    """The keys matching `match`, a SCAN batch at a time (never `KEYS`); on a cluster, every
    primary's in turn."""
    if not isinstance(client, RedisCluster):
        cursor: int = 0
        while True:
            cursor, keys = await client.scan(cursor=cursor, match=match, count=count)
            if keys:
                yield list(keys)
            if cursor == 0:
                return
    await client.initialize()  # a no-op once the slot map is known
    for node in client.get_primaries():
        async for keys in _scan_node(client, node, match, count):
            yield keys


async def _scan_node(
    client: RedisCluster, node: ClusterNode, match: str, count: int
) -> AsyncIterator[list[bytes | str]]:
    cursor: int = 0
    while True:
        # With a target node, redis-py answers ({node name: cursor}, keys).
        cursors, keys = await client.scan(
            cursor=cursor, match=match, count=count, target_nodes=node
        )
        if keys:
            yield list(keys)
        cursor = int(cursors[node.name]) if isinstance(cursors, dict) else int(cursors)
        if cursor == 0:
            return


async def unlink_matching(client: RedisClient, match: str) -> int:
    removed = 0
    async for keys in scan_batches(client, match):
        removed += int(await client.unlink(*keys))
    return removed
