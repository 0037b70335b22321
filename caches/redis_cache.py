"""L2: exact-match entries in Redis, shared by every gateway replica.

Guarantees: one Redis string per entry, `SET ... EX` so Redis expires it; values are the versioned
msgpack records of `caches.codec`, checked against the key on read — a garbled, foreign-version or
wrong-key value is a miss and is deleted. Every command is bounded by the layer's timeout (socket
timeouts here, the chain's deadline around each call) with at most one immediate retry on a broken
connection, so a dead Redis costs a request at most about one timeout. Nothing here walks the
keyspace with `KEYS`: `clear` and `stats` use `SCAN` over this layer's own prefix. With a
`KeyPresence` mirror (`caches.presence`), a lookup of a key Redis does not hold is a miss without
a round trip — only while the mirror is synced.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Callable

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from caches.base import CachedResponse, CacheKey, CacheStats
from caches.codec import CorruptEntry, decode, encode
from caches.presence import KeyPresence

log = logging.getLogger(__name__)

SCAN_BATCH = 1000


async def scan_batches(
    client: aioredis.Redis, match: str, count: int = SCAN_BATCH
) -> AsyncIterator[list[bytes | str]]:
    """The keys matching `match`, a SCAN batch at a time (never `KEYS`)."""
    cursor: int = 0
    while True:
        cursor, keys = await client.scan(cursor=cursor, match=match, count=count)
        if keys:
            yield list(keys)
        if cursor == 0:
            return


async def unlink_matching(client: aioredis.Redis, match: str) -> int:
    removed = 0
    async for keys in scan_batches(client, match):
        removed += int(await client.unlink(*keys))
    return removed


def connect(url: str, *, timeout: float, max_connections: int) -> aioredis.Redis:
    """A pooled client whose every wait is bounded by `timeout` seconds."""
    # A plain pool: the blocking one's condition and timer cost ~10% of an L2 hit. Past
    # `max_connections` concurrent commands a lookup fails at once and counts as a miss.
    pool = aioredis.ConnectionPool.from_url(
        url,
        max_connections=max_connections,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        # One immediate retry replaces a pooled connection that died with a restarted server.
        retry=Retry(NoBackoff(), 1),
        retry_on_error=[RedisConnectionError],
        health_check_interval=0,
    )
    # `from_pool`: the client owns the pool and closes it on `aclose()`.
    return aioredis.Redis.from_pool(pool)


class RedisCache:
    name = "l2"

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str,
        timeout: float,
        clock: Callable[[], float] = time.time,
        owns_client: bool = True,
        presence: bool = False,
    ) -> None:
        self._redis = client
        self._prefix = f"{prefix}:x:"
        self.presence = KeyPresence(client, self._prefix) if presence else None
        self.timeout: float | None = timeout
        self._clock = clock
        self._owns_client = owns_client
        self.corrupt = 0

    @property
    def client(self) -> aioredis.Redis:
        return self._redis

    def _rkey(self, key: CacheKey) -> str:
        return self._prefix + key.digest

    async def start(self) -> None:
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
            data = await self._redis.execute_command("GET", rkey)  # type: ignore[no-untyped-call]
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
