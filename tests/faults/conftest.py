"""The gateway in process, with its Redis behind a fault proxy, an engine over TCP, and a paced
load generator that records every request."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from caches import CacheChain
from config import Settings
from engine.fake import FakeEngine
from gateway.app import create_app
from gateway.state import AppState
from tests.asgi_server import served
from tests.faults.proxy import FaultProxy, fault_proxy
from tests.redisproc import RedisServer

ENGINE_DELAY = 0.02  # seconds the fake engine takes for every answer


@dataclass
class Sample:
    started: float  # perf_counter
    seconds: float
    status: int
    cache: str


@dataclass
class Stack:
    client: httpx.AsyncClient
    engine: FakeEngine
    proxy: FaultProxy
    state: AppState
    samples: list[Sample] = field(default_factory=list)

    @property
    def chain(self) -> CacheChain:
        return self.state.chain

    async def ask(self, content: str) -> None:
        body = {
            "model": "strata-fake",
            "temperature": 0,
            "messages": [{"role": "user", "content": content}],
        }
        started = time.perf_counter()
        try:
            reply = await self.client.post("/v1/chat/completions", json=body, timeout=30)
            status, cache = reply.status_code, reply.headers.get("x-strata-cache", "")
        except httpx.HTTPError:
            status, cache = 0, ""
        self.samples.append(Sample(started, time.perf_counter() - started, status, cache))

    async def load(self, seconds: float, rate: float, *, repeats: int = 20) -> None:
        """`rate` requests per second for `seconds`: half repeat one of `repeats` questions
        (hits once stored), half are new (misses)."""
        tag = uuid.uuid4().hex[:8]
        tasks: set[asyncio.Task[None]] = set()
        started = time.perf_counter()
        n = 0
        while (now := time.perf_counter()) - started < seconds:
            content = f"repeat {n % repeats}" if n % 2 else f"new {tag} {n}"
            task = asyncio.create_task(self.ask(content))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
            await asyncio.sleep(max(0.0, started + n / rate - now))
        await asyncio.gather(*tasks)

    def window(self, start: float, end: float) -> list[Sample]:
        return [s for s in self.samples if start <= s.started < end]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@pytest.fixture
async def stack(redis_server: RedisServer) -> AsyncIterator[Stack]:
    async with open_stack(redis_server) as opened:
        yield opened


@asynccontextmanager
async def open_stack(redis_server: RedisServer) -> AsyncIterator[Stack]:
    """A gateway in process whose Redis is `redis_server` behind a fault proxy; a fresh one
    each time (its own key prefix, breakers and caches)."""
    redis_server.start()
    engine = FakeEngine(model="strata-fake", delay=ENGINE_DELAY, answer_bytes=300)
    async with served(engine) as engine_url, fault_proxy("127.0.0.1", redis_server.port) as proxy:
        settings = Settings(
            engine_url=engine_url,
            redis_url=f"redis://{proxy.url}/0",
            redis_key_prefix=f"faults-{uuid.uuid4().hex[:8]}",
            semantic="off",
            log_level="warning",
        )
        app = create_app(settings)
        async with LifespanManager(app) as manager:
            state: AppState = manager._state["strata"]  # the lifespan's typed state
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
                yield Stack(client, engine, proxy, state)


def summary(samples: list[Sample]) -> dict[str, Any]:
    seconds = [s.seconds for s in samples]
    return {
        "requests": len(samples),
        "failed": sum(s.status != 200 for s in samples),
        "p50_ms": round(percentile(seconds, 0.5) * 1000, 1) if seconds else None,
        "p99_ms": round(percentile(seconds, 0.99) * 1000, 1) if seconds else None,
    }
