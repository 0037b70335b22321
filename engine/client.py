"""The gateway's connection to one OpenAI-compatible engine (vLLM).

Guarantees: one pool of keep-alive connections per engine URL (`engine.http11`, or, when an httpx
transport is injected, `engine.httpx_transport` over it), owned and closed by this object; every
request has connect, read, write and pool timeouts; transport failures surface as `EngineError`
subclasses (503 unreachable, 504 too slow, 502 broken) and never as a transport's own exceptions;
HTTP answers of any status are handed back as they came, for the caller to pass through or map
with `engine.errors.upstream_error`.

Completion calls (`post`, `open_stream`) go through a circuit breaker (`engine.breaker`): after
`breaker_threshold` calls in a row fail without an answer (unreachable, timed out, broken before
its head), calls fail at once with `EngineUnavailable` until a trial call succeeds, so a dead
engine costs clients no waiting. A call whose connection could not be opened — nothing reached
the engine — is retried up to `retries` times, after a jittered backoff; nothing else is retried
(the engine may have started on it). Health checks bypass the breaker.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Protocol

import httpx

from engine.breaker import Breaker
from engine.errors import EngineError, EngineUnavailable
from engine.http11 import ConnectionPool
from engine.httpx_transport import HttpxTransport
from engine.transport import Timeouts, Transport, UpstreamResponse

JSON = "application/json"


@dataclass(frozen=True, slots=True)
class EngineResponse:
    status: int
    body: bytes
    content_type: str


async def read_whole(response: UpstreamResponse) -> EngineResponse:
    """Read a response's whole body and close it (closed even when reading fails)."""
    try:
        content = await response.read()
    finally:
        await response.aclose()
    return EngineResponse(response.status, content, response.content_type or JSON)


class Engine(Protocol):
    """What the gateway asks of its engine: one `EngineClient`, or an `engine.pool.EnginePool` of
    replicas. `affinity` is a request's key for prefix-aware routing (`engine.routing`); only a
    pool with `prefix_routing` reads it, so callers compute it only when that is true."""

    @property
    def prefix_routing(self) -> bool: ...

    async def post(
        self, path: str, body: bytes, *, affinity: int | None = None
    ) -> EngineResponse: ...

    async def open_stream(
        self, path: str, body: bytes, *, affinity: int | None = None
    ) -> UpstreamResponse: ...

    async def get(self, path: str, *, deadline: float | None = None) -> EngineResponse: ...

    async def probe(self, path: str, body: bytes, *, deadline: float) -> EngineResponse: ...

    async def models(self) -> EngineResponse: ...

    async def healthy(self) -> bool: ...

    async def aclose(self) -> None: ...


class EngineClient:
    # One engine: nothing to route, so requests need no affinity key.
    prefix_routing = False

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
        breaker: Breaker | None = None,
        retries: int = 2,
        retry_backoff: float = 0.05,
    ) -> None:
        """`transport`: reach the engine through this httpx transport (an ASGI app in process,
        a mock) instead of over the network."""
        self.base_url = base_url.rstrip("/")
        self.breaker = breaker or Breaker(threshold=5, cooldown=2.0)
        self._retries = retries
        self._backoff = retry_backoff
        headers = {"content-type": JSON, "accept": JSON}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self._health_timeout = health_timeout
        timeouts = Timeouts(
            connect=connect_timeout, read=read_timeout, write=read_timeout, pool=connect_timeout
        )
        self._transport: Transport
        if transport is None:
            self._transport = ConnectionPool(
                self.base_url, timeouts=timeouts, max_connections=max_connections, headers=headers
            )
        else:
            self._transport = HttpxTransport(
                transport,
                self.base_url,
                timeouts=timeouts,
                max_connections=max_connections,
                headers=headers,
            )

    async def post(self, path: str, body: bytes, *, affinity: int | None = None) -> EngineResponse:
        """POST a JSON body and read the whole answer (`affinity` is for pools; unused here)."""
        return await read_whole(await self._guarded(path, body))

    async def open_stream(
        self, path: str, body: bytes, *, affinity: int | None = None
    ) -> UpstreamResponse:
        """POST and return the response with its body unread. The caller must `aclose()` it."""
        return await self._guarded(path, body)

    async def _guarded(self, path: str, body: bytes) -> UpstreamResponse:
        """One completion request through the breaker, retried only where nothing was sent."""
        breaker = self.breaker
        attempt = 0
        while True:
            if not breaker.allow():
                raise EngineUnavailable(
                    f"the engine at {self.base_url} is failing; the next attempt goes through "
                    f"in {breaker.retry_in():.1f} s"
                )
            try:
                response = await self._transport.request("POST", path, body)
            except EngineUnavailable:
                breaker.failure()
                if attempt >= self._retries:
                    raise
                attempt += 1
                # Exponential with full jitter, so that many clients do not retry in step.
                await asyncio.sleep(self._backoff * 2 ** (attempt - 1) * random.uniform(0.5, 1.5))  # noqa: S311
                continue
            except EngineError:
                breaker.failure()
                raise
            breaker.success()
            return response

    async def get(self, path: str, *, deadline: float | None = None) -> EngineResponse:
        """GET `path`; `deadline` (seconds) replaces the client's timeouts for this call."""
        timeouts = Timeouts.all(deadline) if deadline is not None else None
        return await self._whole("GET", path, None, timeouts)

    async def probe(self, path: str, body: bytes, *, deadline: float) -> EngineResponse:
        """POST outside the breaker and its retries, bounded by `deadline` seconds as a whole:
        for the gateway's own questions to the engine (its model fingerprint), not for clients."""
        return await self._whole("POST", path, body, Timeouts.all(deadline))

    async def _whole(
        self, method: str, path: str, body: bytes | None, timeouts: Timeouts | None = None
    ) -> EngineResponse:
        response = await self._transport.request(method, path, body, timeouts=timeouts)
        try:
            content = await response.read()
        finally:
            await response.aclose()
        return EngineResponse(response.status, content, response.content_type or JSON)

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
        await self._transport.aclose()
