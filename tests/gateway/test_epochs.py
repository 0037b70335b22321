"""The epoch string: what changes it, and the engine fingerprint behind it."""

from __future__ import annotations

import httpx
import pytest

from caches.generations import Generations
from engine import EngineClient
from engine.fake import FakeEngine
from engine.fingerprint import UNLISTED, fingerprint
from gateway.epochs import EngineEpoch, Epochs, FixedEpoch


async def test_every_scope_and_the_engine_change_the_epoch() -> None:
    generations = Generations(None, "p")
    engine = FixedEpoch()
    epochs = Epochs("7", engine, generations)
    seen = {epochs.of("t1", "m1", "")}
    assert epochs.of("t1", "m1", "") in seen  # stable while nothing changes
    for name in ("all", "t:t1", "m:m1", "n:docs"):
        await generations.bump(name)
        now = epochs.of("t1", "m1", "docs" if name == "n:docs" else "")
        assert now not in seen
        seen.add(now)
    assert epochs.of("t2", "m1", "") != epochs.of("t1", "m1", "")  # tenants never share one
    before = epochs.of("t1", "m1", "")
    engine.value = "another-model"
    assert epochs.of("t1", "m1", "") != before
    engine.value = None
    assert epochs.of("t1", "m1", "") is None  # unknown model: no epoch, nothing cached


def client_for(app: FakeEngine | httpx.MockTransport) -> EngineClient:
    transport = app if isinstance(app, httpx.MockTransport) else httpx.ASGITransport(app=app)
    return EngineClient("http://engine.test", transport=transport)


async def test_the_fingerprint_follows_the_template_and_the_model_not_the_clock() -> None:
    fake = FakeEngine(model="m")
    client = client_for(fake)
    try:
        first = await fingerprint(client)
        assert first is not None
        assert first == await fingerprint(client)
        fake.chat_template = "v2"
        second = await fingerprint(client)
        fake.model = "m-other"
        third = await fingerprint(client)
    finally:
        await client.aclose()
    assert len({first, second, third}) == 3
    assert fake.calls["/tokenize"] >= 3


@pytest.mark.parametrize(
    ("status", "expected"),
    [(404, UNLISTED), (500, None), (401, None)],
)
async def test_fingerprint_of_an_engine_without_a_model_list(
    status: int, expected: str | None
) -> None:
    client = client_for(httpx.MockTransport(lambda request: httpx.Response(status)))
    try:
        assert await fingerprint(client) == expected
    finally:
        await client.aclose()


async def test_a_transient_tokenize_error_is_not_a_new_model() -> None:
    fake = FakeEngine(model="m")
    inner = httpx.ASGITransport(app=fake)
    failing = False

    async def handle(request: httpx.Request) -> httpx.Response:
        if failing and request.url.path == "/tokenize":
            return httpx.Response(503)
        return await inner.handle_async_request(request)

    client = client_for(httpx.MockTransport(handle))
    epoch = EngineEpoch(client, interval=3600)
    try:
        assert await epoch.check()
        known = epoch.value
        failing = True
        assert not await epoch.check()  # could not ask: the known fingerprint stays
        assert epoch.value == known
        failing = False
        fake.chat_template = "v2"
        assert await epoch.check()
    finally:
        await client.aclose()
    assert epoch.changes == 1


async def test_an_unreachable_engine_keeps_the_known_fingerprint() -> None:
    fake = FakeEngine(model="m")
    inner = httpx.ASGITransport(app=fake)
    down = False

    async def handle(request: httpx.Request) -> httpx.Response:
        if down:
            raise httpx.ConnectError("refused", request=request)
        return await inner.handle_async_request(request)

    client = client_for(httpx.MockTransport(handle))
    epoch = EngineEpoch(client, interval=3600)
    try:
        await epoch.check()
        known = epoch.value
        down = True
        assert not await epoch.check()
    finally:
        await client.aclose()
    assert epoch.value == known
    assert epoch.changes == 0
