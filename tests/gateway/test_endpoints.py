"""Models, health, readiness, metrics and the admin API."""

from __future__ import annotations

import httpx
import pytest
from fakeredis import FakeServer
from fakeredis.aioredis import FakeRedis

from caches import MemoryCache, RedisCache
from caches.redis_cache import connect
from tests.clock import FakeClock
from tests.gateway.harness import MODEL, gateway
from tests.redisproc import free_port


async def test_models_come_from_the_engine() -> None:
    async with gateway() as gw:
        response = await gw.client.get("/v1/models")
    assert response.status_code == 200
    assert [m["id"] for m in response.json()["data"]] == [MODEL]


async def test_models_with_engine_down_is_503() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    async with gateway(engine_transport=httpx.MockTransport(refuse)) as gw:
        response = await gw.client.get("/v1/models")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "engine_unavailable"


async def test_healthz() -> None:
    async with gateway() as gw:
        response = await gw.client.get("/healthz")
    assert response.json() == {"status": "ok"}


def with_redis(client_factory):  # type: ignore[no-untyped-def]
    def layers(clock: FakeClock):  # type: ignore[no-untyped-def]
        return [
            MemoryCache(max_entries=10, max_bytes=1 << 20, clock=clock),
            RedisCache(client_factory(), prefix="t", timeout=0.05, clock=clock),
        ]

    return layers


async def test_readyz_ready_when_engine_and_redis_answer() -> None:
    async with gateway(layers=with_redis(lambda: FakeRedis(server=FakeServer()))) as gw:
        response = await gw.client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "checks": {"engine": "up", "redis": "up"}}


async def test_readyz_reports_redis_down_but_stays_ready() -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    factory = with_redis(lambda: connect(dead, timeout=0.05, max_connections=2))
    async with gateway(layers=factory) as gw:
        response = await gw.client.get("/readyz")
        served = await gw.chat()
    assert response.status_code == 200
    assert response.json() == {"status": "degraded", "checks": {"engine": "up", "redis": "down"}}
    assert served.status_code == 200


async def test_readyz_without_redis_layer() -> None:
    async with gateway(layers=lambda clock: [MemoryCache(max_entries=1, max_bytes=1 << 20)]) as gw:
        response = await gw.client.get("/readyz")
    assert response.json()["checks"]["redis"] == "disabled"


async def test_readyz_is_503_when_engine_is_down() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    async with gateway(engine_transport=httpx.MockTransport(refuse)) as gw:
        response = await gw.client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["status"] == "unavailable"


async def test_admin_stats_and_clear_without_key() -> None:
    async with gateway() as gw:
        await gw.chat()
        await gw.chat()
        stats = (await gw.client.get("/admin/cache/stats")).json()["layers"]
        cleared = (await gw.client.post("/admin/cache/clear")).json()
        after = await gw.chat()
    by_layer = {s["layer"]: s for s in stats}
    assert by_layer["l1"]["entries"] == 1
    assert by_layer["l1"]["bytes"] > 0
    assert by_layer["l1"]["hits"] == 1
    assert by_layer["l2"]["entries"] == 1
    assert by_layer["l2"]["misses"] == 1
    assert cleared == {"cleared": {"l1": 1, "l2": 1}, "generation": 1}
    assert after.headers["x-strata-cache"] == "miss"


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"authorization": "Bearer wrong"}, 401),
        ({"authorization": "Basic s3cret"}, 401),
        ({"authorization": "Bearer s3cret"}, 200),
        ({"x-strata-admin-key": "s3cret"}, 200),
        ({"x-strata-admin-key": "s3cret-but-longer"}, 401),
    ],
)
async def test_admin_key_is_required_when_configured(headers: dict[str, str], status: int) -> None:
    async with gateway(admin_key="s3cret") as gw:
        stats = await gw.client.get("/admin/cache/stats", headers=headers)
        clear = await gw.client.post("/admin/cache/clear", headers=headers)
    assert stats.status_code == clear.status_code == status
    if status == 401:
        assert stats.json()["error"]["type"] == "authentication_error"
        assert "s3cret" not in stats.text


async def test_metrics_is_prometheus_text() -> None:
    async with gateway() as gw:
        await gw.chat()
        response = await gw.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "strata_cache_lookups_total" in response.text
    assert 'strata_cache_entries{layer="l1"} 1.0' in response.text


async def test_l2_presence_is_reported_and_a_miss_skips_redis_untimed(redis_server) -> None:  # type: ignore[no-untyped-def]
    redis_server.start()
    prefix = f"presence-{free_port()}"

    def layers(clock: FakeClock):  # type: ignore[no-untyped-def]
        client = connect(redis_server.url, timeout=0.5, max_connections=4)
        return [RedisCache(client, prefix=prefix, timeout=0.5, clock=clock, presence=True)]

    async with gateway(layers=layers) as gw:
        l2 = gw.chain.layers[0]
        assert isinstance(l2, RedisCache)
        assert l2.presence is not None
        await gw.chain.start()
        assert await l2.presence.wait_synced(5.0)
        miss = await gw.chat()
        await gw.chain.settle()  # L2's write happens in the background
        hit = await gw.chat()
        sample = gw.registry.get_sample_value
        assert (miss.headers["x-strata-cache"], hit.headers["x-strata-layer"]) == ("miss", "l2")
        assert sample("strata_l2_presence_synced") == 1
        assert sample("strata_l2_presence_keys") == 1
        assert sample("strata_cache_entries", {"layer": "l2"}) == 1
        assert sample("strata_l2_presence_skipped_lookups_total") == 1
        # The miss the key list answered asked no one: only the hit's lookup is timed.
        assert sample("strata_cache_lookups_total", {"layer": "l2", "result": "miss"}) == 1
        assert sample("strata_cache_lookup_duration_seconds_count", {"layer": "l2"}) == 1
