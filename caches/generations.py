"""Invalidation by scope, for every layer and every replica at once: generation counters.

An invalidation does not hunt for entries. Every scope that can be invalidated — everything, one
tenant, one model, one namespace — has a generation number, and the generations of a request's
scopes are part of its cache key and of its semantic partition (the gateway puts them in the key's
epoch). Bumping a generation therefore makes every entry stored under the old number unreachable
in L1, L2 and L3 in one step, whatever their count; the orphans are reclaimed by their TTL, L1's
LRU, L3's entry bound and Redis's eviction policy.

Guarantees:
- With Redis, the generations live in one hash (`PREFIX:gen`), changed only with `HINCRBY`, so
  concurrent bumps from several replicas never lose one; each bump is announced on the channel
  `PREFIX:gen`, and every replica re-reads the hash when it hears it, when it (re)subscribes and
  every `refresh` seconds. A replica that lost Redis learns of bumps made meanwhile when it
  reconnects. `bump` returns only after Redis has the new number, and this process uses it at
  once (it does not wait for its own announcement). On a Redis Cluster, PUBLISH reaches the
  subscribers of every node, and a replica whose node died subscribes again on the one the
  slot map names once the hash can be read again.
- `drop(digest)` announces that one exact entry was removed, so every replica forgets it in its
  own memory (the listeners registered with `on_drop`).
- Without Redis, the generations are this process's own.
- Reading a generation is a dict lookup: no I/O on the request path. The follower is one owned
  task; every wait on the network is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from caches.redis_client import RedisClient

log = logging.getLogger(__name__)

SCOPES = ("all", "tenant", "model", "namespace")
DROP = "del:"


def field(scope: str, value: str = "") -> str:
    """The hash field of a scope: `all`, `t:TENANT`, `m:MODEL`, `n:NAMESPACE`."""
    if scope == "all":
        return "all"
    if scope not in SCOPES:
        raise ValueError(f"unknown invalidation scope {scope!r}")
    return f"{scope[0]}:{value}"


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class Generations:
    def __init__(
        self,
        client: RedisClient | None,
        prefix: str,
        *,
        timeout: float = 2.0,
        heartbeat: float = 1.0,
        refresh: float = 10.0,
    ) -> None:
        self._redis = client
        self._key = f"{prefix}:gen"
        self._timeout = timeout
        self._heartbeat = heartbeat
        self._refresh = refresh
        self._values: dict[str, int] = {}
        # Changes whenever any generation does: readers may memoise what they derive from them.
        self.version = 0
        self._listeners: list[Callable[[str], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._stop = asyncio.Event()
        self._stale = False
        self.reloads = 0

    # --- the request path ---

    def get(self, name: str) -> int:
        return self._values.get(name, 0)

    def snapshot(self) -> dict[str, int]:
        return dict(self._values)

    # --- changes ---

    def on_drop(self, listener: Callable[[str], None]) -> None:
        self._listeners.append(listener)

    async def bump(self, name: str) -> int:
        """Raise generation `name` (see `field`); its new number."""
        if self._redis is None:
            value = self._values[name] = self._values.get(name, 0) + 1
            self.version += 1
            return value
        async with asyncio.timeout(self._timeout):
            value = int(await self._redis.hincrby(self._key, name, 1))
            self._values[name] = max(value, self._values.get(name, 0))
            self.version += 1
            await self._redis.publish(self._key, name)
        return value

    async def drop(self, digest: str) -> None:
        """Every replica (this one first) forgets the exact entry `digest` in its memory."""
        self._dropped(digest)
        if self._redis is not None:
            async with asyncio.timeout(self._timeout):
                await self._redis.publish(self._key, DROP + digest)

    def _dropped(self, digest: str) -> None:
        for listener in self._listeners:
            listener(digest)

    # --- following the other replicas ---

    async def start(self) -> None:
        """Read the generations (bounded; a Redis that is down now is retried by the follower)
        and follow changes in the background."""
        if self._redis is None or self._task is not None:
            return
        try:
            await self._reload()
        except Exception as exc:
            log.warning("cache generations unavailable at start (%s); retrying", exc)
        self._task = asyncio.create_task(self._follow(), name="strata-generations")

    async def wait_subscribed(self, timeout: float) -> bool:  # noqa: ASYNC109
        try:
            async with asyncio.timeout(timeout):
                await self._subscribed.wait()
        except TimeoutError:
            return False
        return True

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        # Cooperative first: a pub/sub read cancelled mid-reply can leave redis-py waiting.
        self._stop.set()
        done, _ = await asyncio.wait([task], timeout=self._heartbeat + self._timeout)
        if not done:
            task.cancel()
            await asyncio.wait([task], timeout=self._timeout)

    async def _reload(self) -> None:
        assert self._redis is not None
        async with asyncio.timeout(self._timeout):
            stored = await self._redis.hgetall(self._key)
        values = {_text(k): int(v) for k, v in stored.items()}
        # Never backwards: a bump this process made may not be visible to a lagging read.
        for name, value in self._values.items():
            values[name] = max(value, values.get(name, 0))
        if values != self._values:
            self._values = values
            self.version += 1
        self.reloads += 1

    async def _follow(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                await self._listen()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._subscribed.clear()
                failures += 1
                if failures == 1:
                    log.warning("cache generations: lost Redis (%s); retrying", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), min(5.0, 0.1 * 2**failures))
                continue
            failures = 0

    async def _listen(self) -> None:
        assert self._redis is not None
        # Read before subscribing too: on a Redis Cluster the subscription goes to the node
        # serving the channel's slot as the client last knew it, and only a failed command —
        # not a failed subscription — makes the client read the slot map again after a
        # failover.
        await self._reload()
        pubsub = self._redis.pubsub()
        try:
            async with asyncio.timeout(self._timeout):
                await pubsub.subscribe(self._key)
            # redis-py reconnects and resubscribes by itself after a lost link: hear of it, since
            # bumps announced meanwhile were missed.
            if pubsub.connection is not None:
                pubsub.connection.register_connect_callback(self._reconnected)
            # Bumps made while this replica was not listening are in the hash.
            self._stale = False
            await self._reload()
            self._subscribed.set()
            loop = asyncio.get_running_loop()
            last_reload = quiet_since = loop.time()
            awaiting_pong = False
            while not self._stop.is_set():
                message = await pubsub.get_message(timeout=self._heartbeat)
                now = loop.time()
                if message is not None:
                    quiet_since, awaiting_pong = now, False
                    if self._handle(message):
                        await self._reload()
                        last_reload = now
                elif awaiting_pong:
                    raise ConnectionError("no answer to a heartbeat")
                elif now - quiet_since >= self._heartbeat:
                    await pubsub.ping()
                    awaiting_pong = True
                if self._stale or now - last_reload >= self._refresh:
                    self._stale = False
                    await self._reload()
                    last_reload = now
        finally:
            self._subscribed.clear()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pubsub.aclose(), self._timeout)  # type: ignore[no-untyped-call]

    def _reconnected(self, _: Any) -> None:
        self._stale = True

    def _handle(self, message: dict[str, Any]) -> bool:
        """Apply a notice; True when the generations must be read again."""
        if message.get("type") != "message":
            return False  # subscribe confirmations and pongs only prove the link is alive
        data = _text(message.get("data"))
        if data.startswith(DROP):
            self._dropped(data[len(DROP) :])
            return False
        return True
