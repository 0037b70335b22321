"""`engine.transport.Transport` over any httpx transport.

For engines the gateway reaches through httpx rather than a socket of its own: an ASGI app in the
same process (`httpx.ASGITransport`), a scripted or failing engine (`httpx.MockTransport`). The
tests use it that way; the gateway itself talks to its engine through `engine.http11`.

Guarantees: the same as every transport (`engine.transport`): httpx's failures become
`EngineError`s here, once (`map_transport_error`), and a response's `aclose` closes its stream.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import cast

import httpx

from engine.errors import EngineError, EngineProtocolError, EngineTimeout, EngineUnavailable
from engine.transport import Timeouts


def map_transport_error(exc: httpx.HTTPError) -> EngineError:
    """The one place httpx's failures become ours."""
    if isinstance(exc, httpx.TimeoutException):
        if isinstance(exc, httpx.ConnectTimeout):
            return EngineUnavailable(f"the engine did not accept a connection in time ({exc})")
        return EngineTimeout(f"the engine did not answer in time ({type(exc).__name__})")
    if isinstance(exc, httpx.ConnectError):
        return EngineUnavailable(f"the engine is unreachable ({exc})")
    return EngineProtocolError(f"the engine connection failed ({type(exc).__name__}: {exc})")


def _timeout(timeouts: Timeouts) -> httpx.Timeout:
    return httpx.Timeout(
        connect=timeouts.connect, read=timeouts.read, write=timeouts.write, pool=timeouts.pool
    )


class HttpxResponse:
    """An httpx response, its body unread, as an `engine.transport.UpstreamResponse`."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self._chunks: AsyncGenerator[bytes, None] | None = None

    @property
    def status(self) -> int:
        return self._response.status_code

    @property
    def content_type(self) -> str | None:
        value: str | None = self._response.headers.get("content-type")
        return value

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        data = await self.receive()
        if not data:
            raise StopAsyncIteration
        return data

    async def receive(self) -> bytes:
        if self._chunks is None:
            self._chunks = cast(AsyncGenerator[bytes, None], self._response.aiter_bytes())
        try:
            async for chunk in self._chunks:
                if chunk:
                    return chunk
        except httpx.HTTPError as exc:
            raise map_transport_error(exc) from exc
        return b""

    async def read(self) -> bytes:
        parts = []
        while data := await self.receive():
            parts.append(data)
        return b"".join(parts)

    async def aclose(self) -> None:
        with contextlib.suppress(httpx.HTTPError):
            if self._chunks is not None:
                await self._chunks.aclose()
            await self._response.aclose()


class HttpxTransport:
    """One pooled `httpx.AsyncClient` over `transport`, owned and closed by this object."""

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport,
        base_url: str,
        *,
        timeouts: Timeouts,
        max_connections: int = 512,
        headers: dict[str, str] | None = None,
    ) -> None:
        self._client = httpx.AsyncClient(
            base_url=base_url,
            headers=headers,
            timeout=_timeout(timeouts),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            transport=transport,
            trust_env=False,
        )

    async def request(
        self, method: str, path: str, body: bytes | None = None, *, timeouts: Timeouts | None = None
    ) -> HttpxResponse:
        request = self._client.build_request(
            method,
            path,
            content=body,
            timeout=_timeout(timeouts) if timeouts is not None else httpx.USE_CLIENT_DEFAULT,
        )
        try:
            return HttpxResponse(await self._client.send(request, stream=True))
        except httpx.HTTPError as exc:
            raise map_transport_error(exc) from exc

    async def aclose(self) -> None:
        await self._client.aclose()
