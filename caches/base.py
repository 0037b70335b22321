"""The vocabulary every cache layer speaks.

Guarantees: keys and values are immutable; a `CachedResponse` carries the exact response bytes the
engine produced plus the times that decide its freshness; a layer is anything that satisfies
`CacheLayer`, and a layer signals a broken backend by raising (the chain turns that into a counted
miss), never by returning `None` for an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class CacheError(Exception):
    """A cache backend failed (timeout, connection, protocol). Callers treat it as a miss."""


@dataclass(frozen=True, slots=True)
class CacheKey:
    """Where an answer lives: a SHA-256 over everything that can change the output.

    `tenant`, `model` and `route` are also inside `digest`; they are kept in the clear so that a
    stored value can be checked against the key it was stored under, and for invalidation.
    """

    digest: str
    tenant: str
    model: str
    route: str


@dataclass(frozen=True, slots=True)
class CachedResponse:
    """One complete, successful engine answer, as bytes, with its freshness window (unix s)."""

    body: bytes
    created_at: float
    expires_at: float
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def size(self) -> int:
        return len(self.body)

    def age(self, now: float) -> float:
        return max(0.0, now - self.created_at)

    def expired(self, now: float) -> bool:
        return now >= self.expires_at


@dataclass(frozen=True, slots=True)
class CacheStats:
    """What a layer holds right now. `None` where a backend cannot say cheaply or is unreachable."""

    layer: str
    entries: int | None
    bytes: int | None


@runtime_checkable
class CacheLayer(Protocol):
    """One cache tier. Implementations: `MemoryCache` (L1), `RedisCache` (L2)."""

    name: str
    # Seconds the chain allows one operation; `None` for layers that cannot block (memory).
    timeout: float | None

    async def get(self, key: CacheKey) -> CachedResponse | None: ...

    async def set(self, key: CacheKey, value: CachedResponse) -> None: ...

    async def delete(self, key: CacheKey) -> bool: ...

    async def clear(self) -> int: ...

    async def stats(self) -> CacheStats: ...

    async def aclose(self) -> None: ...
