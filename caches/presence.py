"""Which L2 keys exist, known in-process, so that a lookup of a key Redis does not hold can skip
the round trip to Redis.

Redis itself keeps the list current: one dedicated connection turns on client-side-caching
tracking in broadcast mode for the layer's key prefix (`CLIENT TRACKING ON BCAST PREFIX`,
Redis >= 6) and receives an invalidation naming every key under that prefix that any client
writes, deletes, expires or evicts; one SCAN after tracking is on fills in what existed before.

Guarantees:
- `absent(key)` is True only while the mirror is synced: tracking is on, the SCAN that followed
  finished, and the connection answered within the heartbeat. Lose the connection, miss a
  heartbeat, get an unexpected reply — unsynced at once, every lookup goes to Redis until a new
  connection, tracking and SCAN complete.
- A key is never reported absent if it existed when the last SCAN started, or was written by
  this process, or its invalidation arrived. The one window left is a write by another client
  whose invalidation is still in flight (well under a millisecond on a healthy link): a lookup
  then misses a fresh entry and goes to the engine — a lost hit, never a wrong answer.
- An invalidation does not say whether a key was written or removed, so every invalidated key
  counts as present; a key that is gone costs one ordinary GET. A rebuild every
  `resync_interval` drops those, and a flush notice empties the mirror.
- Memory: one hash per key (~70 bytes). Past `max_keys` the mirror gives up and stays off.
- Behind a Sentinel, the tracking connection is to the master the sentinels name, and every
  heartbeat asks them again: once they name another (a failover), or cannot be asked, the
  mirror is unsynced and follows the new master. A killed master ends the connection at once.
- A server without CLIENT TRACKING leaves it off: correct, slower. A Redis Cluster never gets
  one (`caches.redis_cache` leaves it off): keys live on several nodes whose roles change.
- The follower is one task, owned by `start`/`aclose`; every wait on the network is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.exceptions import ResponseError

log = logging.getLogger(__name__)

CHANNEL = b"__redis__:invalidate"
SCAN_BATCH = 1000


class TrackingUnsupported(Exception):
    """The server refused CLIENT TRACKING."""


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class KeyPresence:
    def __init__(
        self,
        client: aioredis.Redis,
        prefix: str,
        *,
        timeout: float = 2.0,
        heartbeat: float = 1.0,
        resync_interval: float = 600.0,
        max_keys: int = 2_000_000,
        retry_delay: tuple[float, float] = (0.5, 30.0),
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._timeout = timeout
        self._heartbeat = heartbeat
        self._resync_interval = resync_interval
        self._max_keys = max_keys
        self._retry_delay = retry_delay
        self._keys: set[int] = set()
        # While a rebuild scans, invalidations go to the new set as well.
        self._fresh: set[int] | None = None
        self._synced = False
        self._task: asyncio.Task[None] | None = None
        self._conn: AbstractConnection | None = None
        self._pings: dict[bytes, asyncio.Future[None]] = {}
        self.off_reason: str | None = None
        self.syncs = 0  # completed SCANs (first sync, resyncs, rebuilds)
        self.skips = 0  # lookups answered "absent" without asking Redis

    @property
    def synced(self) -> bool:
        return self._synced

    def __len__(self) -> int:
        return len(self._keys)

    def absent(self, rkey: str) -> bool:
        """True: Redis does not hold `rkey` (as far as the mirror can tell, see the module)."""
        if self._synced and hash(rkey) not in self._keys:
            self.skips += 1
            return True
        return False

    def add(self, rkey: str) -> None:
        code = hash(rkey)
        self._keys.add(code)
        if self._fresh is not None:
            self._fresh.add(code)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._task is None and self.off_reason is None:
            self._task = asyncio.create_task(self._run(), name="l2-key-presence")

    async def aclose(self) -> None:
        self._synced = False
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def wait_synced(self, timeout: float) -> bool:  # noqa: ASYNC109
        """For tests and start-up: wait until the mirror is synced (or `timeout` passed)."""
        try:
            async with asyncio.timeout(timeout):
                while not self._synced:
                    if self._task is None or self._task.done():
                        return False
                    await asyncio.sleep(0.005)
        except TimeoutError:
            return False
        return True

    async def caught_up(self, timeout: float = 2.0) -> bool:  # noqa: ASYNC109
        """Wait until every write Redis finished before this call is reflected here (a PING on
        the tracking connection: Redis sends the invalidations it owes before the reply)."""
        conn = self._conn
        if conn is None or not self._synced:
            return False
        token = secrets.token_hex(8).encode()
        waiter = asyncio.get_running_loop().create_future()
        self._pings[token] = waiter
        try:
            await conn.send_command("PING", token)
            async with asyncio.timeout(timeout):
                await waiter
        except Exception:
            return False
        finally:
            self._pings.pop(token, None)
        return True

    # ------------------------------------------------------------------ the follower

    async def _run(self) -> None:
        delay = self._retry_delay[0]
        failing = False
        while True:
            syncs = self.syncs
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except TrackingUnsupported as exc:
                self.off_reason = f"the server does not support CLIENT TRACKING ({exc})"
                log.info("l2 key presence off: %s; every L2 lookup asks Redis", self.off_reason)
                return
            except _TooMany:
                self.off_reason = f"more than {self._max_keys} keys"
                log.warning("l2 key presence off: %s; every L2 lookup asks Redis", self.off_reason)
                return
            except Exception as exc:
                if self.syncs > syncs or not failing:
                    log.warning(
                        "l2 key presence lost (%s: %s); L2 lookups ask Redis until it is back",
                        type(exc).__name__,
                        exc,
                    )
                failing = True
            if self.syncs > syncs:
                delay = self._retry_delay[0]  # it had worked: try again soon
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._retry_delay[1])

    async def _command(self, conn: AbstractConnection, *args: Any) -> Any:
        await conn.send_command(*args)
        return await conn.read_response(timeout=self._timeout)

    async def _follow(self) -> None:
        pool = self._client.connection_pool
        # RESP2: invalidations arrive as Pub/Sub messages on this connection, which redis-py
        # hands back as they are (under RESP3 its parser routes them to handlers of its own).
        conn = pool.connection_class(**{**pool.connection_kwargs, "protocol": 2})
        reader: asyncio.Task[None] | None = None
        try:
            async with asyncio.timeout(self._timeout):
                await conn.connect()  # type: ignore[no-untyped-call]
                try:
                    client_id = await self._command(conn, "CLIENT", "ID")
                    if client_id is None:
                        raise ConnectionError("no answer to CLIENT ID")
                    await self._command(
                        conn, "CLIENT", "TRACKING", "ON", "REDIRECT", client_id,
                        "BCAST", "PREFIX", self._prefix,
                    )  # fmt: skip
                except ResponseError as exc:
                    raise TrackingUnsupported(str(exc)) from exc
                reply = await self._command(conn, "SUBSCRIBE", CHANNEL)
                if not isinstance(reply, list) or _text(reply[0]).lower() != "subscribe":
                    raise ConnectionError(f"unexpected SUBSCRIBE reply {reply!r}")
            self._conn = conn
            reader = asyncio.create_task(self._read(conn), name="l2-key-presence-reader")
            loop = asyncio.get_running_loop()
            sentinel = pool if isinstance(pool, SentinelConnectionPool) else None
            while True:
                await self._scan(reader)
                resync_at = loop.time() + self._resync_interval
                while (left := resync_at - loop.time()) > 0:
                    # Behind a Sentinel, writes follow the master the sentinels name: a mirror
                    # of any other server (a demoted master) would miss them.
                    wait = left if sentinel is None else min(left, self._heartbeat)
                    done, _ = await asyncio.wait({reader}, timeout=wait)
                    if done:
                        reader.result()  # raises what ended it
                        raise ConnectionError("the tracking connection closed")
                    if sentinel is not None:
                        await self._still_master(sentinel, conn)
        finally:
            self._synced = False
            self._fresh = None
            self._conn = None
            if reader is not None:
                reader.cancel()
                await asyncio.wait({reader})
                if not reader.cancelled():
                    reader.exception()  # retrieved: what ended it was raised above
            for waiter in self._pings.values():
                waiter.cancel()
            self._pings.clear()
            await conn.disconnect(nowait=True)

    async def _still_master(self, pool: SentinelConnectionPool, conn: AbstractConnection) -> None:
        async with asyncio.timeout(self._timeout):
            host, port = await pool.get_master_address()  # type: ignore[no-untyped-call]
        tracked = (getattr(conn, "host", None), getattr(conn, "port", None))
        if (host, int(port)) != tracked:
            raise ConnectionError("the sentinels name another master; following it")

    async def _scan(self, reader: asyncio.Task[None]) -> None:
        """Rebuild the mirror from a SCAN while invalidations keep arriving; then synced."""
        fresh: set[int] = set()
        self._fresh = fresh
        cursor: int = 0
        while True:
            if reader.done():
                return  # the caller raises the reader's error
            async with asyncio.timeout(self._timeout):
                cursor, keys = await self._client.scan(
                    cursor=cursor, match=self._prefix + "*", count=SCAN_BATCH
                )
            fresh.update(hash(_text(k)) for k in keys)
            if len(fresh) > self._max_keys:
                raise _TooMany
            if cursor == 0:
                break
        self._keys = fresh
        self._fresh = None
        self._synced = True
        self.syncs += 1

    async def _read(self, conn: AbstractConnection) -> None:
        quiet = False
        while True:
            message = await conn.read_response(timeout=self._heartbeat)
            if message is None:
                if quiet:
                    raise ConnectionError("the tracking connection stopped answering")
                quiet = True
                await conn.send_command("PING")
                continue
            quiet = False
            self._handle(message)

    def _handle(self, message: Any) -> None:
        if not isinstance(message, list) or not message:
            raise ConnectionError(f"unexpected message on the tracking connection: {message!r}")
        kind = _text(message[0]).lower()
        if kind == "message" and len(message) == 3:
            keys = message[2]
            if keys is None:  # FLUSHALL / FLUSHDB: every key is gone
                self._keys = set()
                if self._fresh is not None:
                    self._fresh.clear()
                return
            for key in keys:
                self.add(_text(key))
            if len(self._keys) > self._max_keys:
                raise _TooMany
        elif kind == "pong":  # [b"pong", token]: a heartbeat's (empty token) or `caught_up`'s
            token = message[1] if len(message) > 1 else b""
            waiter = self._pings.get(token if isinstance(token, bytes) else str(token).encode())
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        elif kind not in ("subscribe", "unsubscribe"):
            raise ConnectionError(f"unexpected message on the tracking connection: {kind!r}")


class _TooMany(Exception):
    pass
