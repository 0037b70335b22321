"""Semantic entries in Redis, shared by every replica and kept across restarts.

Guarantees: each entry is one versioned msgpack record (`PREFIX:s:e:ID`, expiring with the
answer) holding its partition, question text, vector and the answer record of `caches.codec`
(checked against its key on read); every add and delete is also appended to a Redis Stream
(`PREFIX:s:log`, trimmed to about `stream_length`), which replicas follow with a blocking read so
that an entry stored through one replica is searchable on the others within milliseconds. An
entry is written before the event announcing it. Loading walks the entries with `SCAN` (never
`KEYS`; every primary of a cluster) after noting the stream position, so nothing written during
the load is missed. Unreadable records are skipped and deleted.

On a Redis Cluster no command spans two keys (batched reads are split by slot), so the entries
spread over every slot without hash tags; the stream is one key, on one node.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt
from redis.asyncio.cluster import RedisCluster
from redis.typing import EncodableT, FieldT

from caches.base import CachedResponse, CacheKey
from caches.codec import CorruptEntry, decode, encode
from caches.redis_client import RedisClient, ready, scan_batches, unlink_matching

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
LOAD_BATCH = 500
READY_TIMEOUT = 2.0  # seconds start-up may spend fetching a cluster's slot map


@dataclass(frozen=True, slots=True)
class SemanticEntry:
    """A cached answer as the semantic layer knows it. `id` is the exact key's digest."""

    id: str
    partition: str
    text: str
    vector: npt.NDArray[np.float32]
    key: CacheKey
    value: CachedResponse


def encode_entry(entry: SemanticEntry) -> bytes:
    record = {
        "v": FORMAT_VERSION,
        "id": entry.id,
        "p": entry.partition,
        "t": entry.text,
        "vec": entry.vector.astype(np.float32).tobytes(),
        "k": [entry.key.digest, entry.key.tenant, entry.key.model, entry.key.route],
        "r": encode(entry.key, entry.value),
    }
    packed: bytes = msgpack.packb(record, use_bin_type=True)
    return packed


def decode_entry(data: bytes, dimension: int) -> SemanticEntry:
    try:
        record: Any = msgpack.unpackb(data, raw=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise CorruptEntry(f"not msgpack: {exc}") from exc
    if not isinstance(record, dict) or record.get("v") != FORMAT_VERSION:
        raise CorruptEntry("unknown semantic record format")
    try:
        digest, tenant, model, route = record["k"]
        key = CacheKey(digest=digest, tenant=tenant, model=model, route=route)
        vector = np.frombuffer(record["vec"], dtype=np.float32)
        entry_id, partition, text = record["id"], record["p"], record["t"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptEntry(f"malformed semantic record ({exc})") from exc
    if vector.shape != (dimension,) or not all(
        isinstance(x, str) for x in (entry_id, partition, text, digest, tenant, model, route)
    ):
        raise CorruptEntry("semantic record of the wrong shape")
    if entry_id != digest:
        raise CorruptEntry("semantic record stored under another key")
    return SemanticEntry(entry_id, partition, text, vector.copy(), key, decode(key, record["r"]))


@dataclass(frozen=True, slots=True)
class Event:
    op: str  # "add" or "del"
    entry_id: str
    entry: SemanticEntry | None


class SemanticStore:
    def __init__(
        self,
        client: RedisClient,
        follower: RedisClient,
        *,
        prefix: str,
        dimension: int,
        stream_length: int = 100_000,
        block_ms: int = 1000,
    ) -> None:
        self._redis = client
        self._follower = follower  # its own connection: a blocking read outlives op timeouts
        self._entry_prefix = f"{prefix}:s:e:"
        self._stream = f"{prefix}:s:log"
        self._dimension = dimension
        self._stream_length = stream_length
        self._block_ms = block_ms

    async def put(self, entry: SemanticEntry, ttl: int) -> None:
        key, record = self._entry_prefix + entry.id, encode_entry(entry)
        event: dict[FieldT, EncodableT] = {"op": "add", "id": entry.id}
        if isinstance(self._redis, RedisCluster):
            # A cluster pipeline sends to every node at once: the entry's node could lag the
            # stream's, and a follower find nothing. Two round trips keep the order.
            await self._redis.set(key, record, ex=ttl)
            await self._redis.xadd(
                self._stream, event, maxlen=self._stream_length, approximate=True
            )
            return
        # One connection runs a pipeline in order.
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(key, record, ex=ttl)
            pipe.xadd(self._stream, event, maxlen=self._stream_length, approximate=True)
            await pipe.execute()

    async def remove(self, entry_id: str) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.unlink(self._entry_prefix + entry_id)
            pipe.xadd(
                self._stream, {"op": "del", "id": entry_id},
                maxlen=self._stream_length, approximate=True,
            )  # fmt: skip
            await pipe.execute()

    async def ready(self, timeout: float = READY_TIMEOUT) -> None:  # noqa: ASYNC109
        """Fetch a cluster's slot map for the writer now (see `caches.redis_client.ready`), so
        that the first write, under the store's short timeout, does not have to; a failure is
        left for the first write to meet."""
        try:
            await ready(self._redis, timeout)
        except Exception as exc:
            log.warning("l3: Redis not reachable at start (%s: %s)", type(exc).__name__, exc)

    async def position(self) -> str:
        """The id of the stream's last event ("0-0" if none): follow from here after a load."""
        last = await self._follower.xrevrange(self._stream, count=1)
        if not last:
            return "0-0"
        raw = last[0][0]
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    async def _read(self, keys: list[bytes | str]) -> list[SemanticEntry]:
        if isinstance(self._follower, RedisCluster):
            values = await self._follower.mget_nonatomic(keys)  # one MGET per slot
        else:
            values = await self._follower.mget(keys)
        entries = []
        for key, data in zip(keys, values, strict=True):
            if not isinstance(data, bytes):  # absent (expired meanwhile); never str: no decoding
                continue
            try:
                entries.append(decode_entry(data, self._dimension))
            except CorruptEntry as exc:
                log.warning("l3: dropping an unreadable semantic record (%s)", exc)
                await self._follower.unlink(key)
        return entries

    async def load(self) -> AsyncIterator[SemanticEntry]:
        async for keys in scan_batches(self._follower, self._entry_prefix + "*", LOAD_BATCH):
            for entry in await self._read(keys):
                yield entry

    @property
    def block_seconds(self) -> float:
        return self._block_ms / 1000

    async def follow(self, after: str, stop: asyncio.Event) -> AsyncIterator[tuple[str, Event]]:
        """Events after stream id `after` until `stop` is set; yields (stream id, event).

        Cancelling a blocked read makes redis-py wait out its socket timeout, so a stop is
        cooperative: it takes effect within one block period.
        """
        last = after
        while not stop.is_set():
            found: Any = await self._follower.xread(
                {self._stream: last}, block=self._block_ms, count=100
            )
            for _, events in found or []:
                for raw_id, fields in events:
                    last = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
                    op = _text(fields.get(b"op") or fields.get("op"))
                    entry_id = _text(fields.get(b"id") or fields.get("id"))
                    if not entry_id or op not in ("add", "del"):
                        continue
                    entry = None
                    if op == "add":
                        got = await self._read([self._entry_prefix + entry_id])
                        if not got:
                            continue
                        entry = got[0]
                    yield last, Event(op, entry_id, entry)

    async def aclose(self) -> None:
        await self._follower.aclose()
        await self._redis.aclose()

    async def clear(self) -> int:
        removed = await unlink_matching(self._redis, self._entry_prefix + "*")
        await self._redis.unlink(self._stream)
        return removed


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else ""
