"""The gateway's connection to one OpenAI-compatible engine (vLLM).

Guarantees: one pooled `httpx.AsyncClient` per engine URL, owned and closed by this object; every
request has connect, read, write and pool timeouts; transport failures surface as `EngineError`
subclasses (503 unreachable, 504 too slow, 502 broken) and never as raw httpx exceptions; HTTP
answers of any status are handed back as they came, for the caller to pass through or map with
`engine.errors.upstream_error`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

from engine.errors import (
    EngineError,
    EngineProtocolError,
    EngineTimeout,
    EngineUnavailable,
)

JSON = "application/json"


@dataclass(frozen=True, slots=True)
class EngineResponse:
    status: int
    body: bytes
    content_type: str


def map_transport_error(exc: httpx.HTTPError) -> EngineError:
    """The one place httpx's failures become ours."""
    if isinstance(exc, httpx.TimeoutException):
        if isinstance(exc, httpx.ConnectTimeout):
            return EngineUnavailable(f"the engine did not accept a connection in time ({exc})")
        return EngineTimeout(f"the engine did not answer in time ({type(exc).__name__})")
    if isinstance(exc, httpx.ConnectError):
        return EngineUnavailable(f"the engine is unreachable ({exc})")
    return EngineProtocolError(f"the engine connection failed ({type(exc).__name__}: {exc})")


class EngineClient:
    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 600.0,
        health_timeout: float = 2.0,
        max_connections: int = 512,
        api_key: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"content-type": JSON, "accept": JSON}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self._health_timeout = health_timeout
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(
                connect=connect_timeout,
                read=read_timeout,
                write=read_timeout,
                pool=connect_timeout,
            ),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            transport=transport,
            # The gateway talks to the engine it was pointed at, never through an env proxy.
            trust_env=False,
        )

    async def post(self, path: str, body: bytes) -> EngineResponse:
        """POST a JSON body and read the whole answer."""
        try:
            response = await self._client.post(path, content=body)
        except httpx.HTTPError as exc:
            raise map_transport_error(exc) from exc
        return EngineResponse(
            status=response.status_code,
            body=response.content,
            content_type=response.headers.get("content-type", JSON),
        )

    async def open_stream(self, path: str, body: bytes) -> httpx.Response:
        """POST and return the response with its body unread. The caller must `aclose()` it."""
        request = self._client.build_request("POST", path, content=body)
        try:
            return await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise map_transport_error(exc) from exc

    @staticmethod
    async def iter_stream(response: httpx.Response) -> AsyncIterator[bytes]:
        """The raw bytes of an open stream as they arrive; transport failures as `EngineError`."""
        try:
            async for chunk in response.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            raise map_transport_error(exc) from exc

    async def get(self, path: str, *, deadline: float | None = None) -> EngineResponse:
        """GET `path`; `deadline` (seconds) replaces the client's timeouts for this call."""
        try:
            response = await self._client.get(
                path, timeout=deadline if deadline is not None else httpx.USE_CLIENT_DEFAULT
            )
        except httpx.HTTPError as exc:
            raise map_transport_error(exc) from exc
        return EngineResponse(
            status=response.status_code,
            body=response.content,
            content_type=response.headers.get("content-type", JSON),
        )

    async def models(self) -> EngineResponse:
        return await self.get("/v1/models", deadline=self._health_timeout)

    async def healthy(self) -> bool:
        """vLLM's `/health`; servers without one are healthy if `/v1/models` answers."""
        try:
            response = await self.get("/health", deadline=self._health_timeout)
            if response.status == 404:
                response = await self.models()
        except EngineError:
            return False
        return response.status == 200

    async def aclose(self) -> None:
        await self._client.aclose()
