"""Concurrent identical misses share one engine call (request coalescing, as nginx's
`proxy_cache_lock` or Varnish's waiting list).

Guarantees:
- at most one `Flight` per exact cache key at a time (the key covers the tenant, so tenants never
  share one); the first request to miss leads it, the others wait on it;
- every flight ends exactly once, with an `Outcome`: the complete answer's body (and its usage,
  for the tokens-saved counters), the error the leader got (which is never cached), or neither —
  the leader ended without an answer nobody was waiting for — and a waiter then asks the engine
  itself;
- a waiter waits at most the time it is given; the flight is unaffected by a waiter that gives up
  or goes away.

Pure asyncio: no I/O, no tasks of its own.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from gateway.errors import APIError


@dataclass(frozen=True, slots=True)
class Outcome:
    body: bytes | None = None
    error: APIError | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


NO_ANSWER = Outcome()


class Flight:
    __slots__ = ("_done", "waiters")

    def __init__(self) -> None:
        self._done: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self.waiters = 0

    @property
    def ended(self) -> bool:
        return self._done.done()

    async def wait(self, timeout: float) -> Outcome | None:  # noqa: ASYNC109
        """The flight's outcome, or `None` if it did not end within `timeout` seconds."""
        self.waiters += 1
        try:
            async with asyncio.timeout(timeout):
                # Shielded: a waiter that times out or is cancelled leaves the flight as it is.
                return await asyncio.shield(self._done)
        except TimeoutError:
            return None
        finally:
            self.waiters -= 1

    def _end(self, outcome: Outcome) -> None:
        if not self._done.done():
            self._done.set_result(outcome)


class Flights:
    """The flights in progress, by key digest."""

    def __init__(self) -> None:
        self._flights: dict[str, Flight] = {}
        self.led = 0
        self.joined = 0

    def __len__(self) -> int:
        return len(self._flights)

    def join(self, digest: str) -> tuple[Flight, bool]:
        """The flight for `digest` and whether the caller leads it (it must then `end` it)."""
        flight = self._flights.get(digest)
        if flight is not None:
            self.joined += 1
            return flight, False
        flight = self._flights[digest] = Flight()
        self.led += 1
        return flight, True

    def end(self, digest: str, flight: Flight, outcome: Outcome) -> None:
        """End `flight` (idempotent: the first outcome stands) and let the next miss lead anew."""
        flight._end(outcome)
        if self._flights.get(digest) is flight:
            del self._flights[digest]
