"""The gateway in front of several fake engine replicas, built from settings as `strata serve`
builds it: misses routed by prefix, hits never routed, per-replica metrics, all replicas down."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from prometheus_client import CollectorRegistry

import gateway.flow
from config import Settings
from engine.fake import FakeEngine
from gateway import create_app
from tests.engine.test_pool import FakeReplica, replicas
from tests.gateway.harness import CHAT, MODEL

SYSTEMS = [
    f"You are assistant number {n} of the shop. " + "Be brief and exact. " * 6 for n in range(6)
]


def chat(system: str, question: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "temperature": 0,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
        **extra,
    }


@contextlib.asynccontextmanager
async def gateway_over(
    running: list[FakeReplica], **settings: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, CollectorRegistry]]:
    """The gateway over `running`, built from settings alone (its pool and probes its own)."""
    config = Settings(
        engine_urls=[r.url for r in running],
        redis_enabled=False,
        semantic="off",
        engine_probe_interval=0.05,
        **settings,
    )
    registry = CollectorRegistry()
    app = create_app(config, registry=registry)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://strata.test") as http:
            yield http, registry


@contextlib.asynccontextmanager
async def routing_gateway(
    count: int = 2, **settings: Any
) -> AsyncIterator[tuple[list[FakeReplica], httpx.AsyncClient, CollectorRegistry]]:
    """`count` fake engine replicas and the gateway over them."""
    engines = [FakeEngine() for _ in range(count)]
    async with replicas(*engines) as running, gateway_over(running, **settings) as (http, reg):
        yield running, http, reg


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_misses_sharing_a_system_prompt_go_to_one_replica_and_hits_to_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    computed = []
    original = gateway.flow.affinity_key

    def counting(*args: Any, **kw: Any) -> int | None:
        computed.append(1)
        return original(*args, **kw)

    monkeypatch.setattr(gateway.flow, "affinity_key", counting)
    async with replicas(FakeEngine(), FakeEngine()) as running:
        async with gateway_over(running) as (http, registry):
            for system in SYSTEMS:
                for question in ("Where is my order?", "Can I pay by card?"):
                    miss = await http.post(CHAT, json=chat(system, question))
                    assert miss.headers["x-strata-cache"] == "miss"
                    hit = await http.post(CHAT, json=chat(system, question))
                    assert hit.headers["x-strata-cache"] == "hit"
            streamed = await http.post(CHAT, json=chat(SYSTEMS[0], "Streamed?", stream=True))
            assert streamed.headers["x-strata-cache"] == "miss"
            assert b"[DONE]" in streamed.content
            calls = [r.completions() for r in running]
            assert sum(calls) == 13  # the hits reached no engine
            assert min(calls) > 0  # both replicas serve some prompts
            assert len(computed) == 13  # the key was computed for misses only
            decisions = "strata_engine_routing_decisions_total"
            routed = [sample(registry, decisions, reason=r) for r in ("affinity", "overflow")]
            assert sum(routed) == 13  # by prefix (an overflow: a prompt placed past its share)
            prefixes = "strata_engine_replica_prefixes"
            assert sum(sample(registry, prefixes, replica=r.url) for r in running) == 6
            for replica in running:
                assert sample(registry, "strata_engine_replica_healthy", replica=replica.url) == 1
                answered = sample(
                    registry,
                    "strata_engine_replica_requests_total",
                    replica=replica.url,
                    result="answered",
                )
                assert answered == replica.completions()
                assert sample(registry, "strata_engine_replica_in_flight", replica=replica.url) == 0
        # Each prompt's requests went to one replica: its bodies hold the whole of that prompt.
        for system in SYSTEMS:
            holders = [
                r for r in running
                if any(b["messages"][0]["content"] == system for b in r.engine.last_bodies)
            ]  # fmt: skip
            assert len(holders) == 1


async def test_one_engine_computes_no_affinity(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kw: Any) -> int | None:
        raise AssertionError("one engine needs no affinity key")

    monkeypatch.setattr(gateway.flow, "affinity_key", refuse)
    async with replicas(FakeEngine()) as running:
        config = Settings(engine_url=running[0].url, redis_enabled=False, semantic="off")
        app = create_app(config, registry=CollectorRegistry())
        async with LifespanManager(app) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://s.test") as http:
                answer = await http.post(CHAT, json=chat(SYSTEMS[0], "Hello?"))
                text = (await http.get("/metrics")).text
    assert answer.status_code == 200
    assert "strata_engine_replica" not in text
    assert "strata_engine_metrics_up 0.0" in text  # unlabelled, as always


async def test_a_dead_replica_fails_no_request_and_the_readiness_stays_up() -> None:
    async with routing_gateway(routing_policy="round_robin") as (running, http, registry):
        await running[1].stop()
        answers = [
            await http.post(CHAT, json=chat(SYSTEMS[n], f"q{n}")) for n in range(len(SYSTEMS))
        ]
        assert [a.status_code for a in answers] == [200] * len(SYSTEMS)
        ready = await http.get("/readyz")
        assert ready.status_code == 200
        await http.get("/metrics")
        dead = running[1].url
        assert sample(registry, "strata_engine_replica_healthy", replica=dead) == 0
        assert sample(registry, "strata_engine_replica_ejections_total", replica=dead) == 1
        assert sample(registry, "strata_engine_metrics_up", replica=dead) == 0
        assert sample(registry, "strata_breaker_open", target="engine") == 0


async def test_every_replica_down_is_a_503_engine_unavailable() -> None:
    async with routing_gateway() as (running, http, registry):
        for replica in running:
            await replica.stop()
        answer = await http.post(CHAT, json=chat(SYSTEMS[0], "Anyone there?"))
        assert answer.status_code == 503
        error = answer.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "engine_unavailable"
        assert (await http.get("/readyz")).status_code == 503
        await http.get("/metrics")
        assert sample(registry, "strata_breaker_open", target="engine") == 1


async def test_every_strata_metric_of_a_routing_gateway_is_documented() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text("utf-8")
    async with routing_gateway() as (_, http, registry):
        await http.post(CHAT, json=chat(SYSTEMS[0], "Hello?"))
        await http.get("/metrics")
        families = [f for f in registry.collect() if f.name.startswith("strata_engine")]
    names = {f.name + "_total" if f.type == "counter" else f.name for f in families}
    assert "strata_engine_routing_decisions_total" in names
    assert sorted(name for name in names if f"`{name}`" not in docs) == []
