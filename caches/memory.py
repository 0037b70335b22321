"""L1: an in-process LRU bounded by entry count and by total body bytes, with per-entry expiry.

Guarantees: `get` and `set` are O(1) (an `OrderedDict` with `move_to_end`/`popitem(last=False)`);
after every `set` both bounds hold; an expired entry is never returned and is dropped when seen;
a value larger than the byte bound is not stored at all (it would evict everything else). With
`max_entries == 0` the layer stores nothing. Time comes from an injectable clock.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from caches.base import CachedResponse, CacheKey, CacheStats

Clock = Callable[[], float]


class MemoryCache:
    name = "l1"
    timeout: float | None = None

    def __init__(self, *, max_entries: int, max_bytes: int, clock: Clock = time.time) -> None:
        if max_entries < 0 or max_bytes < 0:
            raise ValueError("bounds must be non-negative")
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._clock = clock
        self._data: OrderedDict[str, tuple[CacheKey, CachedResponse]] = OrderedDict()
        self._bytes = 0

    @property
    def enabled(self) -> bool:
        return self._max_entries > 0 and self._max_bytes > 0

    def __len__(self) -> int:
        return len(self._data)

    @property
    def bytes(self) -> int:
        return self._bytes

    def peek(self, key: CacheKey) -> CachedResponse | None:
        """The synchronous form of `get`, for callers on the hit path that need no await."""
        item = self._data.get(key.digest)
        if item is None:
            return None
        stored_key, value = item
        if stored_key != key:
            # Same digest, different key material: never serve it.
            return None
        if value.expired(self._clock()):
            self._remove(key.digest)
            return None
        self._data.move_to_end(key.digest)
        return value

    async def get(self, key: CacheKey) -> CachedResponse | None:
        return self.peek(key)

    def put(self, key: CacheKey, value: CachedResponse) -> None:
        size = value.size
        # A newer answer replaces the old one even when it cannot be kept itself.
        self._remove(key.digest)
        if not self.enabled or size > self._max_bytes or value.expired(self._clock()):
            return
        self._data[key.digest] = (key, value)
        self._bytes += size
        while len(self._data) > self._max_entries or self._bytes > self._max_bytes:
            _, (_, evicted) = self._data.popitem(last=False)
            self._bytes -= evicted.size

    async def set(self, key: CacheKey, value: CachedResponse) -> None:
        self.put(key, value)

    def _remove(self, digest: str) -> bool:
        item = self._data.pop(digest, None)
        if item is None:
            return False
        self._bytes -= item[1].size
        return True

    async def delete(self, key: CacheKey) -> bool:
        return self._remove(key.digest)

    def discard(self, digest: str) -> None:
        """Forget the entry stored under `digest`, if any (another replica removed it)."""
        self._remove(digest)

    async def clear(self) -> int:
        count = len(self._data)
        self._data.clear()
        self._bytes = 0
        return count

    async def stats(self) -> CacheStats:
        return CacheStats(layer=self.name, entries=len(self._data), bytes=self._bytes)

    async def aclose(self) -> None:
        await self.clear()
