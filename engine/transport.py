"""The seam between `EngineClient` and whatever carries its requests.

Guarantees: a `Transport` sends one request to the engine and hands back an `UpstreamResponse` as
soon as the status line and headers are in, its body unread; the body is then read in pieces as
they arrive (`receive`, or `async for`) or whole (`read`), and `aclose` always releases what the
response holds — before the body was read to the end, that means closing its connection, which is
how the engine learns that nobody is listening any more. Every failure of a transport is an
`EngineError` (503 unreachable, 504 too slow, 502 broken); an HTTP answer of any status is a
response, not an error.

Two transports: `engine.http11.ConnectionPool` (the gateway's own, on asyncio) and
`engine.httpx_transport.HttpxTransport` (over any httpx transport: in-process apps, mocks).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds each wait may take: opening a connection, writing the request, each wait for more
    of the response, and waiting for a free connection when all are in use."""

    connect: float
    read: float
    write: float
    pool: float

    @classmethod
    def all(cls, seconds: float) -> Timeouts:
        return cls(seconds, seconds, seconds, seconds)


class UpstreamResponse(Protocol):
    @property
    def status(self) -> int: ...

    @property
    def content_type(self) -> str | None: ...

    async def receive(self) -> bytes:
        """The body bytes that have arrived since the last call (waiting for some when none
        have); `b""` once the body is complete."""
        ...

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def read(self) -> bytes:
        """The rest of the body."""
        ...

    async def aclose(self) -> None: ...


class Transport(Protocol):
    async def request(
        self, method: str, path: str, body: bytes | None = None, *, timeouts: Timeouts | None = None
    ) -> UpstreamResponse:
        """Send `method path` (with `body`), return once the response head is in. The caller must
        `aclose()` the response."""
        ...

    async def aclose(self) -> None: ...
