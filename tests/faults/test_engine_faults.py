"""The engine's link failing under the gateway: reset mid-stream, swallowed, refused. Clients get
OpenAI-shaped errors (an error event once a stream has started), nothing half-done is stored, and
the gateway serves again as soon as the engine does."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import orjson
import pytest
from asgi_lifespan import LifespanManager

from config import Settings
from engine.fake import FakeEngine
from gateway.app import create_app
from gateway.state import AppState
from tests.asgi_server import served
from tests.asgi_stream import StreamingASGITransport
from tests.faults.proxy import FaultProxy, fault_proxy


@dataclass
class Link:
    client: httpx.AsyncClient
    engine: FakeEngine
    proxy: FaultProxy
    state: AppState


@pytest.fixture
async def link() -> AsyncIterator[Link]:
    engine = FakeEngine(model="strata-fake", answer_bytes=3000, chunk_delay=0.01)
    async with served(engine) as url:
        port = int(url.rsplit(":", 1)[1])
        async with fault_proxy("127.0.0.1", port) as proxy:
            settings = Settings(
                engine_url=f"http://{proxy.url}",
                engine_read_timeout=0.5,
                engine_breaker_cooldown=0.3,
                redis_enabled=False,
                semantic="off",
                log_level="warning",
            )
            app = create_app(settings)
            async with LifespanManager(app) as manager:
                state: AppState = manager._state["strata"]
                # Streams reach the client as the gateway sends them (httpx's own ASGI transport
                # would hand over the whole body at the end).
                transport = StreamingASGITransport(manager.app)
                async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
                    yield Link(client, engine, proxy, state)


def body(stream: bool, content: str = "tell me a story") -> dict[str, object]:
    return {
        "model": "strata-fake",
        "temperature": 0,
        "stream": stream,
        "messages": [{"role": "user", "content": content}],
    }


async def test_a_reset_mid_stream_ends_in_an_error_event_and_stores_nothing(link: Link) -> None:
    async with link.client.stream("POST", "/v1/chat/completions", json=body(True)) as reply:
        assert reply.status_code == 200
        pieces = []
        async for piece in reply.aiter_bytes():
            pieces.append(piece)
            if len(pieces) == 3:
                link.proxy.set_mode("reset")
    text = b"".join(pieces).decode()
    events = [e[len("data: ") :] for e in text.split("\n\n") if e.startswith("data: ")]
    assert events[-1] != "[DONE]"
    assert "error" in orjson.loads(events[-1])
    link.proxy.set_mode("pass")
    link.engine.chunk_delay = 0
    again = await link.client.post("/v1/chat/completions", json=body(True))
    assert again.headers["x-strata-cache"] == "miss"  # the broken stream was not stored
    assert again.text.endswith("data: [DONE]\n\n")


async def test_a_swallowing_engine_link_times_out_then_the_breaker_answers_at_once(
    link: Link,
) -> None:
    link.proxy.set_mode("blackhole")
    statuses = []
    for i in range(5):  # the breaker's threshold
        reply = await link.client.post("/v1/chat/completions", json=body(False, f"q{i}"))
        statuses.append(reply.status_code)
        assert reply.json()["error"]["code"] in ("engine_timeout", "engine_unavailable")
    assert statuses == [504] * 5
    started = time.perf_counter()
    fast = await link.client.post("/v1/chat/completions", json=body(False, "q-fast"))
    assert time.perf_counter() - started < 0.1
    assert (fast.status_code, fast.json()["error"]["code"]) == (503, "engine_unavailable")
    link.proxy.set_mode("pass")
    link.proxy.drop_open()
    time.sleep(0.3)
    back = await link.client.post("/v1/chat/completions", json=body(False, "q-back"))
    assert back.status_code == 200


async def test_an_engine_that_hangs_up_without_answering_is_a_502(link: Link) -> None:
    link.proxy.set_mode("refuse")  # accepts, then closes at once
    reply = await link.client.post("/v1/chat/completions", json=body(False))
    assert (reply.status_code, reply.json()["error"]["code"]) == (502, "bad_gateway")
    link.proxy.set_mode("pass")
    assert (await link.client.post("/v1/chat/completions", json=body(False))).status_code == 200
