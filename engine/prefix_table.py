"""Which replica holds each live prefix: the memory behind prefix-aware placement.

vLLM keeps a prefix's KV blocks on the replica that computed it, for as long as its cache can
keep them; the gateway's best guess of where a prefix lives is where it last sent it. Guarantees:

- `owner(key)` is the replica the key was last placed on, while it was seen within `ttl` seconds
  (a prefix unused that long has likely been evicted from the engine's cache anyway); older
  entries, and the oldest ones past `max_keys`, are forgotten, oldest first.
- `counts[i]` is always the number of live keys owned by replica i: the input to the prefix
  bound of `engine.routing.place`.
- `forget_replica(i)` drops every key of an ejected replica (its cache is gone or unreachable),
  so they are placed afresh.
- `route(key, ...)` is `engine.routing.place` fed with this table's owner and counts, and
  records its answer: the one place where a placement and the table meet.
- Pure bookkeeping: no I/O, no tasks; time from an injected monotonic clock; each call costs O(1)
  amortized (forgetting a replica: O(keys)).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from engine.routing import Choice, Ring, place

# A prefix unused this long is taken to be gone from the engine's cache.
PREFIX_TTL = 300.0
MAX_KEYS = 100_000


class PrefixTable:
    def __init__(
        self,
        replicas: int,
        *,
        ttl: float = PREFIX_TTL,
        max_keys: int = MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if replicas < 1 or ttl <= 0 or max_keys < 1:
            raise ValueError("replicas, ttl and max_keys must be positive")
        self._ttl = ttl
        self._max = max_keys
        self._clock = clock
        # key -> (owner, last seen), least recently seen first.
        self._entries: OrderedDict[int, tuple[int, float]] = OrderedDict()
        self.counts = [0] * replicas

    def __len__(self) -> int:
        return len(self._entries)

    def _drop_oldest(self) -> None:
        _, (owner, _) = self._entries.popitem(last=False)
        self.counts[owner] -= 1

    def _expire(self, now: float) -> None:
        entries = self._entries
        while entries and now - next(iter(entries.values()))[1] > self._ttl:
            self._drop_oldest()

    def owner(self, key: int) -> int | None:
        """The replica `key` lives on, if it is still live."""
        self._expire(self._clock())
        entry = self._entries.get(key)
        return None if entry is None else entry[0]

    def place(self, key: int, replica: int) -> None:
        """`key` was just sent to `replica`, its owner from now on."""
        now = self._clock()
        entries = self._entries
        entry = entries.pop(key, None)
        if entry is not None:
            self.counts[entry[0]] -= 1
        elif len(entries) >= self._max:
            self._drop_oldest()
        entries[key] = (replica, now)
        self.counts[replica] += 1

    def seen(self, key: int) -> None:
        """`key` was used again (on its owner or, overflowing, elsewhere): it stays live."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries[key] = (entry[0], self._clock())
            self._entries.move_to_end(key)

    def route(
        self,
        key: int,
        ring: Ring,
        loads: Sequence[int],
        healthy: Sequence[bool],
        eligible: Sequence[bool],
        *,
        factor: float,
        slack: int = 0,
    ) -> Choice | None:
        """`engine.routing.place` with this table's owner of `key` and live prefix counts; the
        result is recorded: a new home owns the key from now on, otherwise it stays live."""
        choice = place(
            key, ring, loads, healthy, eligible, factor=factor, slack=slack,
            owner=self.owner(key), prefixes=self.counts,
        )  # fmt: skip
        if choice is not None and choice.home:
            self.place(key, choice.index)
        else:
            self.seen(key)
        return choice

    def forget_replica(self, replica: int) -> None:
        doomed = [key for key, (owner, _) in self._entries.items() if owner == replica]
        for key in doomed:
            del self._entries[key]
        self.counts[replica] = 0
