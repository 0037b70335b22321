"""Invalidation by tenant, model, namespace and everything; the automatic model epoch; forgetting a
bad answer — in one gateway and across two gateways sharing a real Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from prometheus_client import CollectorRegistry

from config import Settings
from engine import EngineClient
from engine.fake import FakeEngine
from gateway import create_app
from gateway.flow import CompletionService
from tests.gateway.harness import CHAT, MODEL, Harness, chat_body, gateway, semantic_gateway
from tests.polling import eventually
from tests.redisproc import RedisServer

KEYS = {"team-a": "sk-team-a-0001", "team-b": "sk-team-b-0002"}


def auth(tenant: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[tenant]}"}


def service_of(app: Any) -> CompletionService:
    service: CompletionService = app.state.strata.service if hasattr(app, "state") else None
    return service


async def invalidate(gw: Harness, scope: str, value: str | None = None) -> httpx.Response:
    body: dict[str, Any] = {"scope": scope}
    if value is not None:
        body["value"] = value
    return await gw.client.post("/admin/cache/invalidate", json=body)


async def served(gw: Harness, body: dict[str, Any], **kw: Any) -> str:
    response = await gw.chat(body, **kw)
    assert response.status_code == 200, response.text
    return response.headers["x-strata-cache"]


async def test_invalidating_a_tenant_leaves_the_others_alone() -> None:
    async with gateway(api_keys=KEYS) as gw:
        for tenant in KEYS:
            assert await served(gw, chat_body(), headers=auth(tenant)) == "miss"
        answer = await invalidate(gw, "tenant", "team-a")
        assert answer.status_code == 200
        assert answer.json() == {"scope": "tenant", "value": "team-a", "generation": 1}
        assert await served(gw, chat_body(), headers=auth("team-a")) == "miss"
        assert await served(gw, chat_body(), headers=auth("team-b")) == "hit"
        assert await served(gw, chat_body(), headers=auth("team-a")) == "hit"  # stored anew
        assert gw.engine_calls() == 3


async def test_invalidating_a_model() -> None:
    async with gateway() as gw:
        await served(gw, chat_body())
        await invalidate(gw, "model", "some-other-model")
        assert await served(gw, chat_body()) == "hit"
        await invalidate(gw, "model", MODEL)
        assert await served(gw, chat_body()) == "miss"


async def test_namespaces_keep_entries_apart_and_are_invalidated_alone() -> None:
    docs = {"x-strata-namespace": "docs-v2"}
    async with gateway() as gw:
        assert await served(gw, chat_body()) == "miss"
        assert await served(gw, chat_body(), headers=docs) == "miss"  # its own entry
        assert await served(gw, chat_body(), headers=docs) == "hit"
        await invalidate(gw, "namespace", "docs-v2")
        assert await served(gw, chat_body(), headers=docs) == "miss"
        assert await served(gw, chat_body()) == "hit"
        bad = await gw.chat(chat_body(), headers={"x-strata-namespace": "no spaces allowed"})
        assert bad.status_code == 400
        assert bad.json()["error"]["param"] == "x-strata-namespace"


async def test_invalidating_everything_and_clearing() -> None:
    async with gateway(api_keys=KEYS) as gw:
        for tenant in KEYS:
            await served(gw, chat_body(), headers=auth(tenant))
        assert (await invalidate(gw, "all")).json()["generation"] == 1
        for tenant in KEYS:
            assert await served(gw, chat_body(), headers=auth(tenant)) == "miss"
        cleared = (await gw.client.post("/admin/cache/clear")).json()
        assert cleared["generation"] == 2
        assert cleared["cleared"]["l1"] == 4  # the two orphaned by the bump, two new ones
        for tenant in KEYS:
            assert await served(gw, chat_body(), headers=auth(tenant)) == "miss"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"scope": "everything"}, "scope"),
        ({"scope": "tenant"}, "value"),
        ({"scope": "tenant", "value": ""}, "value"),
        ({"scope": "tenant", "value": "nobody"}, "value"),
        ({"scope": "model", "value": 3}, "value"),
        ({"scope": "all", "extra": 1}, "extra"),
    ],
)
async def test_bad_invalidations_are_400s(body: dict[str, Any], param: str) -> None:
    async with gateway(api_keys=KEYS) as gw:
        answer = await gw.client.post("/admin/cache/invalidate", json=body)
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == param


async def test_invalidation_needs_the_admin_key() -> None:
    async with gateway(admin_key="admin-secret-1") as gw:
        refused = await invalidate(gw, "all")
        allowed = await gw.client.post(
            "/admin/cache/invalidate",
            json={"scope": "all"},
            headers={"x-strata-admin-key": "admin-secret-1"},
        )
    assert refused.status_code == 401
    assert allowed.status_code == 200


def epoch_changes(gw: Harness) -> float:
    return gw.registry.get_sample_value("strata_model_epoch_changes_total") or 0.0


async def test_after_a_model_change_no_answer_of_the_old_model_is_served() -> None:
    engine = FakeEngine(model=MODEL)
    bodies = [chat_body(f"question {i}") for i in range(20)]
    async with gateway(engine=engine, model_epoch_interval=0.02) as gw:
        old = [(await gw.chat(body)).json()["choices"][0]["message"] for body in bodies]
        assert [await served(gw, body) for body in bodies] == ["hit"] * 20
        # The operator restarts vLLM with another chat template (or model): it answers otherwise.
        engine.chat_template = "template v2"
        calls = gw.engine_calls()
        await eventually(lambda: epoch_changes(gw) == 1)
        new = []
        for body, before in zip(bodies, old, strict=True):
            response = await gw.chat(body)
            assert response.headers["x-strata-cache"] == "miss"
            new.append(response.json()["choices"][0]["message"])
            assert new[-1] != before  # the new model's answer
        for _ in range(2):
            for body, expected in zip(bodies, new, strict=True):
                response = await gw.chat(body)
                assert response.headers["x-strata-cache"] == "hit"
                assert response.json()["choices"][0]["message"] == expected
        assert gw.engine_calls() == calls + 20  # each asked once, then cached under the new epoch


async def test_nothing_is_cached_while_the_engines_model_was_never_known() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    async with gateway(engine_transport=httpx.MockTransport(refuse), model_epoch_auto=True) as gw:
        response = await gw.chat(chat_body())
        metrics = gw.registry.get_sample_value("strata_model_epoch_known")
    assert response.status_code == 503
    assert metrics == 0.0


async def test_a_late_engine_gets_cached_once_known() -> None:
    engine = FakeEngine(model=MODEL)
    up = False

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if not up and scope["type"] == "http":
            raise ConnectionRefusedError
        await engine(scope, receive, send)

    async def gated(request: httpx.Request) -> httpx.Response:
        if not up:
            raise httpx.ConnectError("refused", request=request)
        return await httpx.ASGITransport(app=engine).handle_async_request(request)

    class Gate(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            return await gated(request)

    async with gateway(
        engine=engine, engine_transport=Gate(), model_epoch_auto=True, model_epoch_interval=0.02
    ) as gw:
        up = True
        await eventually(lambda: gw.registry.get_sample_value("strata_model_epoch_known") == 1.0)
        first = await gw.chat(chat_body())
        second = await gw.chat(chat_body())
    assert (first.headers["x-strata-cache"], second.headers["x-strata-cache"]) == ("miss", "hit")


async def test_forgetting_a_bad_answer_removes_it_and_its_semantic_neighbours() -> None:
    question = chat_body("how do i reset my password")
    paraphrase = chat_body("my password how do i reset")  # cosine 1.0 with the hashing embedder
    unrelated = chat_body("what is the capital of france")
    async with semantic_gateway() as gw:
        await served(gw, question)
        await served(gw, unrelated)
        assert (await gw.chat(paraphrase)).headers["x-strata-layer"] == "l3"
        answer = await gw.client.post("/admin/cache/forget", json={"request": paraphrase})
        assert answer.status_code == 200, answer.text
        # The paraphrase's own exact entry was never stored; the neighbour that served it was.
        assert answer.json()["semantic"] == 1
        assert await served(gw, paraphrase) == "miss"
        assert await served(gw, unrelated) == "hit"
        forgotten = await gw.client.post("/admin/cache/forget", json={"request": unrelated})
        assert forgotten.json()["layers"] == 2  # L1 and L2
        assert await served(gw, unrelated) == "miss"
        bad = await gw.client.post("/admin/cache/forget", json={"request": {"model": MODEL}})
        assert bad.status_code == 400


# --- two gateways on one real Redis ---


@asynccontextmanager
async def replica(
    redis_url: str, prefix: str, engine: FakeEngine
) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(
        redis_url=redis_url, redis_key_prefix=prefix, semantic="off", model_epoch_interval=0.05
    )
    async with AsyncExitStack() as stack:
        client = EngineClient("http://engine.test", transport=httpx.ASGITransport(app=engine))
        stack.push_async_callback(client.aclose)
        app = create_app(settings, engine=client, registry=CollectorRegistry())
        manager = await stack.enter_async_context(LifespanManager(app))
        yield await stack.enter_async_context(
            httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://s")
        )


async def cache_of(client: httpx.AsyncClient, body: dict[str, Any]) -> str:
    response = await client.post(CHAT, json=body)
    assert response.status_code == 200, response.text
    return response.headers["x-strata-cache"]


async def test_an_invalidation_on_one_replica_holds_on_the_other(redis_server: RedisServer) -> None:
    redis_server.start()
    engine = FakeEngine(model=MODEL)
    prefix = f"inv-{uuid.uuid4().hex[:8]}"
    async with (
        replica(redis_server.url, prefix, engine) as a,
        replica(redis_server.url, prefix, engine) as b,
    ):
        assert await cache_of(a, chat_body()) == "miss"
        assert await cache_of(b, chat_body()) == "hit"  # from L2, now in b's L1 too
        bumped = await a.post("/admin/cache/invalidate", json={"scope": "all"})
        assert bumped.status_code == 200
        loop = asyncio.get_running_loop()
        started = loop.time()
        # b hears of it within a second; from then on it never serves the old entry.
        while await cache_of(b, chat_body()) == "hit":
            assert loop.time() - started < 1.0
            await asyncio.sleep(0.01)
        # b stored the new answer under the new generation; a finds it in L2 once written.
        started = loop.time()
        while await cache_of(a, chat_body()) != "hit":
            assert loop.time() - started < 1.0
            await asyncio.sleep(0.01)

        other = chat_body("another question")
        assert await cache_of(a, other) == "miss"
        started = loop.time()
        while await cache_of(b, other) != "hit":  # once a's background L2 write landed
            assert loop.time() - started < 1.0
            await asyncio.sleep(0.01)
        forgotten = await a.post("/admin/cache/forget", json={"request": other})
        assert forgotten.json()["layers"] == 2
        started = loop.time()
        while await cache_of(b, other) == "hit":  # b's L1 copy goes when the notice arrives
            assert loop.time() - started < 1.0
            await asyncio.sleep(0.01)
