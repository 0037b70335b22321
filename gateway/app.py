"""The gateway application, built from arguments.

Guarantees: nothing happens at import; `create_app` wires settings, engine client, cache chain and
metrics registry, creating only what was not injected; the lifespan opens every resource it created
in one `AsyncExitStack` and closes them in reverse order on shutdown (an injected resource belongs
to whoever created it); handlers reach the wiring through the typed lifespan state.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from starlette.types import Receive, Scope, Send

from caches import CacheChain, CacheLayer, MemoryCache, RedisCache
from caches.generations import Generations
from caches.redis_cache import connect
from caches.semantic import SemanticCache
from config import Settings
from engine import Engine, EngineClient, EnginePool
from engine.breaker import Breaker
from engine.fleet import EngineFleet
from engine.launcher import EngineLaunchError, EngineSupervisor
from gateway import admin, errors, routes
from gateway.engine_metrics import EngineMetrics
from gateway.epochs import EngineEpoch, Epochs, FixedEpoch
from gateway.fastpath import CompletionRoutes
from gateway.flow import CompletionService
from gateway.metrics import GatewayMetrics
from gateway.openapi import document_completion_routes
from gateway.state import AppState

log = logging.getLogger(__name__)


def build_chain(settings: Settings, *, clock: Callable[[], float] = time.time) -> CacheChain:
    """L1 then L2, each only if enabled in `settings`."""
    layers: list[CacheLayer] = []
    gates: dict[str, Breaker] = {}
    if settings.l1_max_entries > 0 and settings.l1_max_bytes > 0:
        layers.append(
            MemoryCache(
                max_entries=settings.l1_max_entries,
                max_bytes=int(settings.l1_max_bytes),
                clock=clock,
            )
        )
    if settings.redis_enabled:
        client = connect(
            settings.redis_url,
            timeout=settings.redis_timeout,
            max_connections=settings.redis_max_connections,
        )
        layers.append(
            RedisCache(
                client,
                prefix=settings.redis_key_prefix,
                timeout=settings.redis_timeout,
                clock=clock,
                presence=settings.redis_presence,
            )
        )
        gates["l2"] = Breaker(
            threshold=settings.redis_breaker_threshold, cooldown=settings.redis_breaker_cooldown
        )
    return CacheChain(layers, clock=clock, gates=gates)


def semantic_available() -> bool:
    return all(importlib.util.find_spec(name) for name in ("sentence_transformers", "faiss"))


async def build_semantic(settings: Settings, clock: Callable[[], float]) -> SemanticCache | None:
    """L3 as configured, its model loaded off the event loop; None when it is off."""
    if settings.semantic == "off" or (settings.semantic == "auto" and not semantic_available()):
        log.info("semantic cache (L3) off")
        return None
    from caches.embedder import EmbeddingBatcher, SentenceTransformerEmbedder  # noqa: PLC0415
    from caches.semantic_store import SemanticStore  # noqa: PLC0415
    from caches.vector_index import VectorIndex  # noqa: PLC0415
    from caches.verifier import Verifier  # noqa: PLC0415

    embedder = await asyncio.to_thread(
        SentenceTransformerEmbedder,
        settings.semantic_model,
        threads=settings.semantic_embed_threads,
        dtype=settings.semantic_embed_dtype,
    )
    store = None
    if settings.redis_enabled:
        store = SemanticStore(
            connect(settings.redis_url, timeout=settings.redis_timeout, max_connections=32),
            # The follower blocks on the stream for a second at a time: its own, longer timeout.
            connect(settings.redis_url, timeout=5.0, max_connections=2),
            prefix=settings.redis_key_prefix,
            dimension=embedder.dimension,
        )
    verifier = Verifier.default()
    floor = settings.semantic_min_similarity
    return SemanticCache(
        batcher=EmbeddingBatcher(
            embedder,
            max_batch=settings.semantic_batch_size,
            max_wait=settings.semantic_batch_wait_ms / 1000,
        ),
        verifier=verifier,
        index=VectorIndex(
            embedder.dimension,
            max_entries=settings.semantic_max_entries,
            hnsw_threshold=settings.semantic_hnsw_threshold,
            clock=clock,
        ),
        store=store,
        min_similarity=verifier.min_similarity if floor is None else floor,
        candidates=settings.semantic_candidates,
        token_cache=settings.semantic_token_cache,
        store_timeout=settings.redis_timeout,
        clock=clock,
    )


async def build_epochs(
    settings: Settings, engine: Engine, chain: CacheChain, stack: AsyncExitStack
) -> Epochs:
    """The configured epoch, the engine's fingerprint and the invalidation generations, started
    (every replica on one Redis shares the generations) and closed with `stack`."""
    client = None
    if settings.redis_enabled:
        client = connect(settings.redis_url, timeout=settings.redis_timeout, max_connections=8)
        stack.push_async_callback(client.aclose)
    generations = Generations(client, settings.redis_key_prefix)
    for layer in chain.layers:
        if isinstance(layer, MemoryCache):
            generations.on_drop(layer.discard)
    stack.push_async_callback(generations.aclose)
    await generations.start()
    engine_epoch: EngineEpoch | FixedEpoch = FixedEpoch()
    if settings.model_epoch_auto:
        engine_epoch = EngineEpoch(
            engine, interval=settings.model_epoch_interval, deadline=settings.engine_health_timeout
        )
        stack.push_async_callback(engine_epoch.aclose)
        await engine_epoch.start()
    return Epochs(settings.model_epoch, engine_epoch, generations)


def build_client(settings: Settings, url: str, *, retries: int) -> EngineClient:
    return EngineClient(
        url,
        connect_timeout=settings.engine_connect_timeout,
        read_timeout=settings.engine_read_timeout,
        health_timeout=settings.engine_health_timeout,
        max_connections=settings.engine_max_connections,
        api_key=settings.engine_api_key.get_secret_value() if settings.engine_api_key else None,
        breaker=Breaker(
            threshold=settings.engine_breaker_threshold, cooldown=settings.engine_breaker_cooldown
        ),
        retries=retries,
    )


def build_engine(settings: Settings) -> EngineClient | EnginePool:
    """One engine: its client, as it always was. Several: a pool routing over their clients.

    A pool's clients do not retry a connection that could not be opened on their own replica:
    the pool sends the request to another one at once (see `engine.pool`).
    """
    urls = settings.upstream_urls
    if len(urls) == 1:
        return build_client(settings, urls[0], retries=settings.engine_retries)
    return EnginePool(
        [build_client(settings, url, retries=0) for url in urls],
        policy=settings.routing_policy,
        load_factor=settings.routing_load_factor,
        load_slack=settings.routing_load_slack,
        ejection_window=settings.engine_ejection_window,
        probe_interval=settings.engine_probe_interval,
    )


class GatewayApp(FastAPI):
    """FastAPI, with the completion routes served in front of it (`gateway.fastpath`).

    In front of all of it, not as a middleware inside: FastAPI's own per-request work (its
    telemetry check reads three OpenTelemetry providers), Starlette's error middleware and the
    body-limit middleware would otherwise run on every completion and wrap every `send` of a
    stream.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._completions = CompletionRoutes(super().__call__)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._completions(scope, receive, send)


def create_app(
    settings: Settings,
    *,
    engine: Engine | None = None,
    cache: CacheChain | None = None,
    registry: CollectorRegistry | None = None,
    clock: Callable[[], float] = time.time,
    launcher: EngineSupervisor | EngineFleet | None = None,
    semantic: SemanticCache | None = None,
) -> FastAPI:
    """The gateway app. With `launcher`, the lifespan starts vLLM (every replica of it) first
    and stops it last."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[dict[str, AppState]]:
        async with AsyncExitStack() as stack:
            if launcher is not None:
                stack.push_async_callback(launcher.stop)
                try:
                    await launcher.start()
                except EngineLaunchError as exc:
                    log.error("%s", exc)
                    raise
            engine_client = engine
            if engine_client is None:
                built = build_engine(settings)
                stack.push_async_callback(built.aclose)
                if isinstance(built, EnginePool):
                    await built.start()
                engine_client = built
            chain = cache
            if chain is None:
                chain = build_chain(settings, clock=clock)
                stack.push_async_callback(chain.aclose)
                await chain.start()
            metrics_registry = registry
            if metrics_registry is None:
                metrics_registry = CollectorRegistry()
                ProcessCollector(registry=metrics_registry)
                PlatformCollector(registry=metrics_registry)
            l3 = semantic
            if l3 is None and settings.semantic != "off":
                l3 = await build_semantic(settings, clock)
                if l3 is not None:
                    stack.push_async_callback(l3.aclose)
            if l3 is not None:
                await l3.start()
            epochs = await build_epochs(settings, engine_client, chain, stack)
            metrics = GatewayMetrics(metrics_registry)
            service = CompletionService(
                settings,
                engine_client,
                chain,
                clock=clock,
                observe_engine=metrics.observe_engine,
                semantic=l3,
                epochs=epochs,
            )
            stack.push_async_callback(service.aclose)
            engine_metrics = EngineMetrics(engine_client)
            collector = metrics.bind(service, chain, engine_metrics)
            stack.callback(metrics_registry.unregister, collector)
            stack.callback(metrics_registry.unregister, metrics.engine_seconds)
            redis = next((lay for lay in chain.layers if isinstance(lay, RedisCache)), None)
            yield {
                "strata": AppState(
                    settings=settings,
                    engine=engine_client,
                    chain=chain,
                    service=service,
                    registry=metrics_registry,
                    redis=redis,
                    body_limit=int(settings.max_body_bytes),
                    engine_metrics=engine_metrics,
                )
            }

    app = GatewayApp(
        title="Strata",
        summary="OpenAI-compatible caching gateway for vLLM",
        version="0.1.0",
        lifespan=lifespan,
    )
    errors.install(app)
    app.include_router(routes.router)
    app.include_router(admin.router)
    document_completion_routes(app)
    return app
