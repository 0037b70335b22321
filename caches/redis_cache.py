"""L2: exact-match entries in Redis, shared by every gateway replica.

Guarantees: one Redis string per entry, `SET ... EX` so Redis expires it; values are the versioned
msgpack records of `caches.codec`, checked against the key on read — a garbled, foreign-version or
wrong-key value is a miss and is deleted. Every command is bounded by the layer's timeout (socket
timeouts here, the chain's deadline around each call) with at most one immediate retry on a broken
connection, so a dead Redis costs a request at most about one timeout. Nothing here walks the
keyspace with `KEYS`: `clear` and `stats` use `SCAN` over this layer's own prefix (on every
primary of a Redis Cluster). No operation spans two entries, so on a cluster entries spread
over every slot without hash tags. With a `KeyPresence` mirror (`caches.presence`; not on a
cluster), a lookup of a key Redis does not hold is a miss without a round trip — only while
the mirror is synced.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from caches.base import CachedResponse, CacheKey, CacheStats
from caches.codec import CorruptEntry, decode, encode
from caches.presence import KeyPresence
from caches.redis_client import (
    SCAN_BATCH,
    RedisClient,
    connect,
    ready,
    scan_batches,
    unlink_matching,
)

__all__ = ["SCAN_BATCH", "RedisCache", "connect"]

log = logging.getLogger(__name__)

# How long start-up may spend fetching a cluster's slot map before the first lookup.
READY_TIMEOUT = 2.0


class RedisCache:
    name = "l2"

    def __init__(
        self,
        client: RedisClient,
        *,
        prefix: str,
        timeout: float,
        clock: Callable[[], float] = time.time,
        owns_client: bool = True,
        presence: bool = False,
    ) -> None:
        self._redis = client
        self._prefix = f"{prefix}:x:"
        self.presence: KeyPresence | None = None
        if presence and not isinstance(client, RedisCluster):
            self.presence = KeyPresence(client, self._prefix)
        elif presence:
            # One tracking connection per primary, kept right across failovers and resharding,
            # is not built: without it the mirror could call a key absent that a node holds.
            log.info("l2 key presence off: Redis Cluster; every L2 lookup asks Redis")
        self.timeout: float | None = timeout
        self._clock = clock
        self._owns_client = owns_client
        self.corrupt = 0

    @property
    def client(self) -> RedisClient:
        return self._redis

    def _rkey(self, key: CacheKey) -> str:
        return self._prefix + key.digest

    async def start(self) -> None:
        try:
            await ready(self._redis, READY_TIMEOUT)
        except Exception as exc:
            # Not fatal: every lookup tries again, and fails as a miss until Redis answers.
            log.warning("l2: Redis not reachable at start (%s: %s)", type(exc).__name__, exc)
        if self.presence is not None:
            await self.presence.start()

    def known_absent(self, key: CacheKey) -> bool:
        """Redis does not hold `key`, as the synced key-presence mirror knows without asking."""
        return self.presence is not None and self.presence.absent(self._rkey(key))

    async def get(self, key: CacheKey) -> CachedResponse | None:
        rkey = self._rkey(key)
        if self.presence is not None and self.presence.absent(rkey):
            return None
        try:
            # execute_command: `get` adds an argument-deprecation wrapper to every hit.
            data = await self._redis.execute_command("GET", rkey)
        except ResponseError as exc:
            if "WRONGTYPE" not in str(exc):
                raise
            # Something that is not ours sits at our key: unreadable, so drop it.
            self.corrupt += 1
            log.warning("l2: dropping a non-string value at an entry key")
            await self._redis.unlink(rkey)
            return None
        if data is None:
            return None
        if not isinstance(data, bytes):
            data = data.encode()
        try:
            value = decode(key, data)
        except CorruptEntry as exc:
            self.corrupt += 1
            log.warning("l2: dropping unreadable entry (%s)", exc)
            await self._redis.unlink(rkey)
            return None
        if value.expired(self._clock()):
            return None
        return value

    async def set(self, key: CacheKey, value: CachedResponse) -> None:
        ttl = math.ceil(value.expires_at - self._clock())
        if ttl <= 0:
            return
        rkey = self._rkey(key)
        await self._redis.set(rkey, encode(key, value), ex=ttl)
        if self.presence is not None:
            self.presence.add(rkey)  # visible to this process at once, not one hop later

    async def delete(self, key: CacheKey) -> bool:
        return bool(await self._redis.unlink(self._rkey(key)))

    async def clear(self) -> int:
        return await unlink_matching(self._redis, self._prefix + "*")

    async def stats(self) -> CacheStats:
        entries = size = 0
        async for keys in scan_batches(self._redis, self._prefix + "*"):
            async with self._redis.pipeline(transaction=False) as pipe:
                for k in keys:
                    pipe.strlen(k)
                lengths = await pipe.execute()
            entries += len(keys)
            size += sum(int(n) for n in lengths)
        return CacheStats(layer=self.name, entries=entries, bytes=size)

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except (RedisConnectionError, RedisTimeoutError, OSError):
            return False

    async def aclose(self) -> None:
        if self.presence is not None:
            await self.presence.aclose()
        if self._owns_client:
            await self._redis.aclose()
