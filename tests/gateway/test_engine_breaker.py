"""A dead engine through the whole app: OpenAI-shaped 503s, immediate once the breaker is open,
and answers again by itself when the engine is back."""

from __future__ import annotations

import asyncio
import time

import httpx

from engine.fake import FakeEngine
from tests.gateway.harness import MODEL, chat_body, gateway


async def test_a_dead_engine_gets_fast_503s_and_recovers_by_itself() -> None:
    fake = FakeEngine(model=MODEL)
    down = True
    asgi = httpx.ASGITransport(app=fake)

    async def handle(request: httpx.Request) -> httpx.Response:
        if down:
            raise httpx.ConnectError("connection refused", request=request)
        return await asgi.handle_async_request(request)

    async with gateway(engine_transport=httpx.MockTransport(handle)) as gw:
        engine = gw.engine_client
        assert engine is not None
        engine.breaker.cooldown = 0.3
        failures = [await gw.chat(chat_body(f"q{i}")) for i in range(2)]  # 3 attempts each
        assert engine.breaker.state == "open"
        started = time.perf_counter()
        fast = await gw.chat(chat_body("q-fast"))
        elapsed = time.perf_counter() - started
        metrics = (await gw.client.get("/metrics")).text
        down = False
        await asyncio.sleep(0.3)  # the cooldown; then the next call is the trial
        back = await gw.chat(chat_body("q-back"))
    for reply in (*failures, fast):
        assert reply.status_code == 503
        error = reply.json()["error"]
        assert error["code"] == "engine_unavailable"
        assert set(error) >= {"message", "type", "param", "code"}
    assert elapsed < 0.1
    assert 'strata_breaker_open{target="engine"} 1.0' in metrics
    assert back.status_code == 200
    assert engine.breaker.state == "closed"
