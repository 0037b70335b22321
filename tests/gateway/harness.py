"""The real gateway app, in process, in front of the in-process fake engine."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from asgi_lifespan import LifespanManager
from fakeredis import FakeServer
from fakeredis.aioredis import FakeRedis
from prometheus_client import CollectorRegistry

from caches import CacheChain, CacheLayer, MemoryCache, RedisCache
from caches.embedder import EmbeddingBatcher, HashingEmbedder
from caches.semantic import SemanticCache, Verifier
from caches.vector_index import VectorIndex
from config import Settings
from engine import EngineClient
from engine.fake import FakeEngine
from gateway import create_app
from tests.asgi_server import served
from tests.asgi_stream import StreamingASGITransport
from tests.caches.semantic_fakes import CosineVerifier
from tests.clock import FakeClock

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MODEL = "strata-fake"


def chat_body(content: str = "What is the capital of France?", **params: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
    }
    body.update(params)
    return body


@dataclass
class Harness:
    client: httpx.AsyncClient
    engine: FakeEngine
    clock: FakeClock
    chain: CacheChain
    registry: CollectorRegistry
    settings: Settings
    # With `streaming=True`: both hops stream like real connections (see tests.asgi_stream).
    engine_link: StreamingASGITransport | None = None
    engine_client: EngineClient | None = None
    # The started app itself, e.g. to serve it on a socket (`tests.asgi_server.served`).
    app: Any = None

    def engine_calls(self, path: str = CHAT) -> int:
        return self.engine.calls[path]

    async def chat(self, body: dict[str, Any] | None = None, **kw: Any) -> httpx.Response:
        return await self.client.post(CHAT, json=body if body is not None else chat_body(), **kw)


def default_layers(clock: FakeClock) -> Sequence[CacheLayer]:
    fake = FakeRedis(server=FakeServer())
    return [
        MemoryCache(max_entries=100, max_bytes=1 << 20, clock=clock),
        RedisCache(fake, prefix="test", timeout=0.5, clock=clock),
    ]


@asynccontextmanager
async def gateway(
    *,
    layers: Callable[[FakeClock], Sequence[CacheLayer]] = default_layers,
    engine: FakeEngine | None = None,
    engine_transport: httpx.AsyncBaseTransport | None = None,
    read_timeout: float = 5.0,
    semantic: SemanticCache | None = None,
    clock: FakeClock | None = None,
    streaming: bool = False,
    engine_over_tcp: bool = False,
    **settings: Any,
) -> AsyncIterator[Harness]:
    """`streaming`: both hops stream like real connections. `engine_over_tcp`: the fake engine is
    served on a loopback socket and reached with the gateway's own HTTP client, as in production.
    """
    clock = clock or FakeClock()
    fake = engine or FakeEngine(model=MODEL)
    chain = CacheChain(layers(clock), clock=clock)
    settings.setdefault("semantic", "off")  # L3 tests inject their own
    # A scripted engine answers every path with its script, its model list included.
    settings.setdefault("model_epoch_auto", engine_transport is None)
    config = Settings(redis_enabled=False, **settings)
    link = StreamingASGITransport(fake) if streaming and not engine_over_tcp else None
    async with AsyncExitStack() as stack:
        if engine_over_tcp:
            url = await stack.enter_async_context(served(fake))
            client = EngineClient(url, read_timeout=read_timeout)
        else:
            client = EngineClient(
                "http://engine.test",
                read_timeout=read_timeout,
                transport=engine_transport or link or httpx.ASGITransport(app=fake),
            )
        stack.push_async_callback(chain.aclose)
        stack.push_async_callback(client.aclose)
        registry = CollectorRegistry()
        app = create_app(
            config, engine=client, cache=chain, registry=registry, clock=clock, semantic=semantic
        )
        manager = await stack.enter_async_context(LifespanManager(app))
        http = await stack.enter_async_context(
            httpx.AsyncClient(
                transport=(
                    StreamingASGITransport(manager.app)
                    if streaming
                    else httpx.ASGITransport(app=manager.app)
                ),
                base_url="http://strata.test",
            )
        )
        yield Harness(http, fake, clock, chain, registry, config, link, client, manager.app)


@asynccontextmanager
async def semantic_gateway(
    *, verifier: Verifier | None = None, dimension: int = 64, **settings: Any
) -> AsyncIterator[Harness]:
    """`gateway` with an L3 of its own: the hashing embedder (same words: cosine 1.0) and, unless
    another is given, a cosine-only verifier at 0.95."""
    clock = FakeClock()
    l3 = SemanticCache(
        batcher=EmbeddingBatcher(HashingEmbedder(dimension)),
        verifier=verifier or CosineVerifier(0.95),
        index=VectorIndex(dimension, clock=clock),
        min_similarity=0.5,
        clock=clock,
    )
    try:
        async with gateway(semantic=l3, clock=clock, **settings) as gw:
            yield gw
    finally:
        await l3.aclose()
