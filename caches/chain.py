"""The ordered composition of cache layers.

Guarantees:
- lookups go fastest layer first and stop at the first fresh hit, which is promoted into every
  faster layer (keeping its original creation and expiry times);
- writes go through to every layer: to in-process layers (no `timeout`) before `set` returns, to
  remote ones (a `timeout`) in the background — owned, bounded by that timeout, awaited by
  `settle` and `aclose` — so that a slow or unreachable Redis never delays an answer;
- each lookup, write and delete on a layer with a `timeout` is bounded by it; `stats` is bounded
  by `STATS_TIMEOUT` as a whole; `clear` walks the whole keyspace and is not bounded;
- a layer that can tell without I/O that it does not hold a key (`known_absent`, L2 with its
  key-presence mirror) is not called for it: a miss, counted, with no gate involved;
- a layer with a `Gate` (a circuit breaker) is not called while its gate is shut: that lookup
  or write fails at once, counted as an error, so a dead backend costs nothing per request once
  its breaker opened; every lookup, write and delete reports its success or failure to the gate.
  The trial call of a half-open gate runs in the background (owned, bounded by the layer's
  timeout, cancelled by `aclose`) while its request goes on without the layer: no request waits
  on a backend that may still be dead;
- a failing layer is a miss (or a skipped write) for that request — never an exception to the
  caller — counted per layer and logged once when it starts failing and once when it recovers;
- the per-layer hit / miss / error / store counters are plain integers read by stats and metrics
  at scrape time, so the hit path does no metrics work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from caches.base import CachedResponse, CacheError, CacheKey, CacheLayer, CacheStats

log = logging.getLogger(__name__)

T = TypeVar("T")

# Stats may walk a remote keyspace: bounded as a whole rather than per operation.
STATS_TIMEOUT = 5.0


class Gate(Protocol):
    """A circuit breaker as the chain uses it (`engine.breaker.Breaker` is one). `state` is
    "half_open" while the call `allow` just let through is a trial."""

    @property
    def state(self) -> str: ...

    def allow(self) -> bool: ...

    def success(self) -> None: ...

    def failure(self) -> None: ...


class CircuitOpen(CacheError):
    """The layer's breaker is open: it was not called."""


@dataclass(slots=True)
class LayerCounters:
    """`errors` are failed lookups; `store_errors` failed writes, deletes and clears."""

    hits: int = 0
    misses: int = 0
    errors: int = 0
    stores: int = 0
    store_errors: int = 0


@dataclass(frozen=True, slots=True)
class Lookup:
    """The result of one chain lookup: the value (or `None`), the layer that had it, and the
    seconds spent in each layer consulted, in order — exactly 0.0 for a layer that was not asked:
    it knew without I/O that it does not hold the key (`known_absent`), or its gate was shut."""

    value: CachedResponse | None
    layer: str | None
    timings: tuple[tuple[str, float], ...]


@dataclass(frozen=True, slots=True)
class LayerReport:
    layer: str
    entries: int | None
    bytes: int | None
    hits: int
    misses: int
    errors: int
    stores: int
    store_errors: int
    available: bool


class CacheChain:
    def __init__(
        self,
        layers: Sequence[CacheLayer],
        *,
        clock: Callable[[], float] = time.time,
        gates: Mapping[str, Gate] | None = None,
    ) -> None:
        self.layers: tuple[CacheLayer, ...] = tuple(layers)
        names = [layer.name for layer in self.layers]
        if len(set(names)) != len(names):
            raise ValueError(f"layer names must be unique: {names}")
        self.counters: dict[str, LayerCounters] = {name: LayerCounters() for name in names}
        self._failing: dict[str, bool] = dict.fromkeys(names, False)
        self._clock = clock
        self.gates: dict[str, Gate] = dict(gates or {})
        self._known_absent: tuple[Callable[[CacheKey], bool] | None, ...] = tuple(
            getattr(layer, "known_absent", None) for layer in self.layers
        )
        self._trials: set[asyncio.Task[None]] = set()
        self._writes: set[asyncio.Task[None]] = set()
        self._local = tuple(layer for layer in self.layers if layer.timeout is None)
        self._remote = tuple(layer for layer in self.layers if layer.timeout is not None)
        if unknown := set(self.gates) - set(names):
            raise ValueError(f"gates for layers that are not in the chain: {sorted(unknown)}")

    async def _call(self, layer: CacheLayer, op: Coroutine[Any, Any, T]) -> T:
        gate = self.gates.get(layer.name)
        if gate is None:
            return await _bounded(layer, op)
        if not gate.allow():
            op.close()
            raise CircuitOpen(f"{layer.name}: circuit open")
        if gate.state == "half_open":
            trial = asyncio.create_task(self._trial(layer, op, gate))
            self._trials.add(trial)
            trial.add_done_callback(self._trials.discard)
            raise CircuitOpen(f"{layer.name}: circuit half-open, trying it in the background")
        try:
            result = await _bounded(layer, op)
        except Exception:
            gate.failure()
            raise
        gate.success()
        return result

    async def _trial(self, layer: CacheLayer, op: Coroutine[Any, Any, Any], gate: Gate) -> None:
        try:
            await _bounded(layer, op)
        except Exception:
            gate.failure()
            return
        gate.success()
        self._succeeded(layer)

    def _failed(self, layer: CacheLayer, exc: BaseException) -> None:
        if not self._failing[layer.name]:
            self._failing[layer.name] = True
            log.warning(
                "cache layer %s failing (%s: %s); treating it as a miss until it recovers",
                layer.name,
                type(exc).__name__,
                exc,
            )

    def _succeeded(self, layer: CacheLayer) -> None:
        if self._failing[layer.name]:
            self._failing[layer.name] = False
            log.warning("cache layer %s recovered", layer.name)

    async def start(self) -> None:
        """Start the layers' background work (those that have any)."""
        for layer in self.layers:
            start = getattr(layer, "start", None)
            if start is not None:
                await start()

    def failing(self, name: str) -> bool:
        return self._failing[name]

    async def get(self, key: CacheKey, *, max_age: int | None = None) -> Lookup:
        timings: list[tuple[str, float]] = []
        for index, layer in enumerate(self.layers):
            counters = self.counters[layer.name]
            absent = self._known_absent[index]
            if absent is not None and absent(key):
                timings.append((layer.name, 0.0))
                counters.misses += 1
                continue
            started = time.perf_counter()
            try:
                value = await self._call(layer, layer.get(key))
            except Exception as exc:
                asked = not isinstance(exc, CircuitOpen)
                timings.append((layer.name, time.perf_counter() - started if asked else 0.0))
                counters.errors += 1
                self._failed(layer, exc)
                continue
            timings.append((layer.name, time.perf_counter() - started))
            self._succeeded(layer)
            if value is None or (max_age is not None and value.age(self._clock()) > max_age):
                counters.misses += 1
                continue
            counters.hits += 1
            if index:
                await self._write(self.layers[:index], key, value)
            return Lookup(value=value, layer=layer.name, timings=tuple(timings))
        return Lookup(value=None, layer=None, timings=tuple(timings))

    async def _write(
        self, layers: Sequence[CacheLayer], key: CacheKey, value: CachedResponse
    ) -> None:
        for layer in layers:
            counters = self.counters[layer.name]
            try:
                await self._call(layer, layer.set(key, value))
            except Exception as exc:
                counters.store_errors += 1
                self._failed(layer, exc)
                continue
            self._succeeded(layer)
            counters.stores += 1

    async def set(self, key: CacheKey, value: CachedResponse) -> None:
        await self._write(self._local, key, value)
        if self._remote:
            write = asyncio.create_task(self._write(self._remote, key, value))
            self._writes.add(write)
            write.add_done_callback(self._writes.discard)

    async def settle(self) -> None:
        """Until every write in the background has finished (each is bounded by its timeout)."""
        while self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    async def delete(self, key: CacheKey) -> int:
        removed = 0
        for layer in self.layers:
            try:
                removed += bool(await self._call(layer, layer.delete(key)))
            except Exception as exc:
                self.counters[layer.name].store_errors += 1
                self._failed(layer, exc)
        return removed

    async def clear(self) -> dict[str, int | None]:
        """Remove every entry from every layer; `None` for a layer that could not be cleared."""
        cleared: dict[str, int | None] = {}
        for layer in self.layers:
            try:
                # Clearing walks the whole keyspace; it is not bounded by the per-op timeout.
                cleared[layer.name] = await layer.clear()
            except Exception as exc:
                self.counters[layer.name].store_errors += 1
                self._failed(layer, exc)
                cleared[layer.name] = None
        return cleared

    async def stats(self) -> list[LayerReport]:
        reports = []
        for layer in self.layers:
            available = True
            try:
                async with asyncio.timeout(STATS_TIMEOUT):
                    stats = await layer.stats()
            except Exception as exc:
                log.warning("cache layer %s: stats unavailable (%s)", layer.name, exc)
                stats, available = CacheStats(layer=layer.name, entries=None, bytes=None), False
            c = self.counters[layer.name]
            reports.append(
                LayerReport(
                    layer=layer.name,
                    entries=stats.entries,
                    bytes=stats.bytes,
                    hits=c.hits,
                    misses=c.misses,
                    errors=c.errors,
                    stores=c.stores,
                    store_errors=c.store_errors,
                    available=available,
                )
            )
        return reports

    async def aclose(self) -> None:
        await self.settle()
        for trial in list(self._trials):
            trial.cancel()
        await asyncio.gather(*self._trials, return_exceptions=True)
        for layer in self.layers:
            try:
                await layer.aclose()
            except Exception as exc:
                log.warning("cache layer %s: close failed (%s)", layer.name, exc)


async def _bounded(layer: CacheLayer, op: Coroutine[Any, Any, T]) -> T:
    """`op`, cut at the layer's `timeout` (layers without one cannot block)."""
    if layer.timeout is None:
        return await op
    async with asyncio.timeout(layer.timeout):
        return await op
