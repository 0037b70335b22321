"""The request flow through the real app: what is served from where, and what reaches the engine."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from caches import CachedResponse, CacheKey, CacheLayer, CacheStats, MemoryCache
from tests.clock import FakeClock
from tests.gateway.harness import MODEL, chat_body, gateway


async def test_repeat_is_answered_from_l1_with_identical_bytes() -> None:
    async with gateway() as gw:
        first = await gw.chat()
        second = await gw.chat()
    assert first.status_code == second.status_code == 200
    assert first.headers["x-strata-cache"] == "miss"
    assert "x-strata-layer" not in first.headers
    assert second.headers["x-strata-cache"] == "hit"
    assert second.headers["x-strata-layer"] == "l1"
    assert second.headers["age"] == "0"
    assert second.content == first.content
    assert gw.engine_calls() == 1


async def test_server_timing_names_layers_and_engine() -> None:
    async with gateway() as gw:
        miss = await gw.chat()
        hit = await gw.chat()
    assert [p.split(";")[0] for p in miss.headers["server-timing"].split(", ")] == [
        "l1",
        "l2",
        "engine",
    ]
    assert hit.headers["server-timing"].startswith("l1;dur=")


async def test_age_grows_with_the_clock() -> None:
    async with gateway() as gw:
        await gw.chat()
        gw.clock.advance(42)
        hit = await gw.chat()
    assert hit.headers["age"] == "42"


async def test_l2_hit_is_promoted_into_l1() -> None:
    async with gateway() as gw:
        await gw.chat()
        l1 = gw.chain.layers[0]
        await l1.clear()
        from_l2 = await gw.chat()
        from_l1 = await gw.chat()
    assert from_l2.headers["x-strata-layer"] == "l2"
    assert from_l1.headers["x-strata-layer"] == "l1"
    assert from_l1.content == from_l2.content
    assert gw.engine_calls() == 1


async def test_sampled_request_is_never_cached() -> None:
    body = chat_body(temperature=0.7)
    async with gateway() as gw:
        first = await gw.chat(body)
        second = await gw.chat(body)
    assert first.headers["x-strata-cache"] == second.headers["x-strata-cache"] == "miss"
    assert first.headers["x-strata-cache-reason"] == "nondeterministic"
    assert gw.engine_calls() == 2
    assert first.json()["choices"][0]["message"] != second.json()["choices"][0]["message"]


@pytest.mark.parametrize(
    ("params", "cached"),
    [
        pytest.param({"temperature": 0}, True, id="temperature-0"),
        pytest.param({"temperature": 0.9, "seed": 7}, True, id="seeded"),
        pytest.param({"temperature": 0, "n": 2}, False, id="n-2"),
        pytest.param({"temperature": None}, False, id="default-temperature"),
    ],
)
async def test_policy_decides_what_is_cached(params: dict[str, Any], cached: bool) -> None:
    body = chat_body(**params)
    async with gateway() as gw:
        await gw.chat(body)
        second = await gw.chat(body)
    assert (second.headers["x-strata-cache"] == "hit") is cached
    assert gw.engine_calls() == (1 if cached else 2)


async def test_completions_route_is_cached_separately_from_chat() -> None:
    body = {"model": MODEL, "prompt": "Once upon a time", "temperature": 0, "max_tokens": 8}
    async with gateway() as gw:
        first = await gw.client.post("/v1/completions", json=body)
        second = await gw.client.post("/v1/completions", json=body)
    assert first.status_code == 200
    assert second.headers["x-strata-cache"] == "hit"
    assert second.json()["object"] == "text_completion"
    assert gw.engine.calls["/v1/completions"] == 1


async def test_unknown_fields_reach_the_engine_untouched() -> None:
    body = chat_body(top_k=5, repetition_penalty=1.1, guided_json={"type": "object"})
    async with gateway() as gw:
        response = await gw.chat(body)
    assert response.status_code == 200
    sent = dict(gw.engine.last_bodies[-1])
    assert sent.pop("cache_salt")  # the gateway's only addition
    assert sent == body


async def test_without_salting_the_body_is_forwarded_as_sent() -> None:
    body = chat_body(cache_salt="client-chosen")
    async with gateway(engine_cache_salt=False) as gw:
        response = await gw.chat(body)
    assert response.status_code == 200
    assert gw.engine.last_bodies[-1] == body


async def test_engine_extras_are_part_of_the_key() -> None:
    async with gateway() as gw:
        await gw.chat(chat_body(top_k=5))
        other = await gw.chat(chat_body(top_k=6))
    assert other.headers["x-strata-cache"] == "miss"
    assert gw.engine_calls() == 2


async def test_no_cache_skips_lookup_but_stores() -> None:
    async with gateway() as gw:
        await gw.chat()
        forced = await gw.chat(headers={"cache-control": "no-cache"})
        after = await gw.chat()
    assert forced.headers["x-strata-cache"] == "miss"
    assert after.headers["x-strata-cache"] == "hit"
    assert gw.engine_calls() == 2


async def test_no_store_neither_reads_nor_writes() -> None:
    async with gateway() as gw:
        first = await gw.chat(headers={"cache-control": "no-store"})
        second = await gw.chat()
    assert first.headers["x-strata-cache"] == "bypass"
    assert second.headers["x-strata-cache"] == "miss"
    assert gw.engine_calls() == 2


async def test_max_age_refuses_older_entries() -> None:
    async with gateway() as gw:
        await gw.chat()
        gw.clock.advance(30)
        fresh_enough = await gw.chat(headers={"cache-control": "max-age=60"})
        too_old = await gw.chat(headers={"Cache-Control": "max-age=10"})
    assert fresh_enough.headers["x-strata-cache"] == "hit"
    assert too_old.headers["x-strata-cache"] == "miss"
    assert gw.engine_calls() == 2


async def test_x_strata_ttl_sets_lifetime() -> None:
    async with gateway(default_ttl=3600) as gw:
        await gw.chat(headers={"x-strata-ttl": "5"})
        gw.clock.advance(4)
        assert (await gw.chat()).headers["x-strata-cache"] == "hit"
        gw.clock.advance(2)
        assert (await gw.chat()).headers["x-strata-cache"] == "miss"


async def test_default_ttl_expires_entries() -> None:
    async with gateway(default_ttl=100) as gw:
        await gw.chat()
        gw.clock.advance(101)
        response = await gw.chat()
    assert response.headers["x-strata-cache"] == "miss"


@pytest.mark.parametrize("finish", ["content_filter", None, "abort"])
async def test_incomplete_answers_are_not_stored(finish: str | None) -> None:
    answer = {
        "id": "x",
        "object": "chat.completion",
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "par"},
                "finish_reason": finish,
            }
        ],
    }
    async with gateway() as gw:
        gw.engine.fail_next.append((200, answer))
        first = await gw.chat()
        second = await gw.chat()
    assert first.status_code == 200
    assert first.json() == answer
    assert second.headers["x-strata-cache"] == "miss"
    assert gw.engine_calls() == 2


async def test_tool_call_answers_are_stored() -> None:
    body = chat_body(tools=[{"type": "function", "function": {"name": "lookup"}}])
    async with gateway() as gw:
        first = await gw.chat(body)
        second = await gw.chat(body)
    assert first.json()["choices"][0]["finish_reason"] == "tool_calls"
    assert second.headers["x-strata-cache"] == "hit"


async def test_answers_over_the_entry_limit_are_not_stored() -> None:
    async with gateway(max_entry_bytes=100) as gw:
        await gw.chat()
        second = await gw.chat()
    assert second.headers["x-strata-cache"] == "miss"


async def test_cache_disabled_bypasses_everything() -> None:
    async with gateway(cache_enabled=False) as gw:
        await gw.chat()
        second = await gw.chat()
    assert second.headers["x-strata-cache"] == "bypass"
    assert gw.engine_calls() == 2


class BrokenLayer:
    """A layer whose backend is down: every operation raises."""

    name = "l2"
    timeout = 0.05

    async def get(self, key: CacheKey) -> CachedResponse | None:
        raise ConnectionError("backend down")

    async def set(self, key: CacheKey, value: CachedResponse) -> None:
        raise ConnectionError("backend down")

    async def delete(self, key: CacheKey) -> bool:
        raise ConnectionError("backend down")

    async def clear(self) -> int:
        raise ConnectionError("backend down")

    async def stats(self) -> CacheStats:
        raise ConnectionError("backend down")

    async def aclose(self) -> None:
        return None


async def test_a_failing_layer_is_a_miss_not_an_error() -> None:
    async with gateway(layers=lambda clock: [BrokenLayer()]) as gw:
        first = await gw.chat()
        second = await gw.chat()
        stats = await gw.client.get("/admin/cache/stats")
    assert first.status_code == second.status_code == 200
    assert second.headers["x-strata-cache"] == "miss"
    assert gw.engine_calls() == 2
    layer = stats.json()["layers"][0]
    assert layer["errors"] == 2
    assert layer["store_errors"] == 2
    assert layer["available"] is False


async def test_l1_serves_while_l2_is_broken() -> None:
    def layers(clock: FakeClock) -> list[CacheLayer]:
        return [MemoryCache(max_entries=10, max_bytes=1 << 20, clock=clock), BrokenLayer()]

    async with gateway(layers=layers) as gw:
        await gw.chat()
        second = await gw.chat()
    assert second.headers["x-strata-layer"] == "l1"


async def test_requests_metric_counts_outcomes() -> None:
    async with gateway() as gw:
        await gw.chat()
        await gw.chat()
        await gw.chat(chat_body(temperature=0.5))
        await gw.chat(headers={"cache-control": "no-store"})
        text = (await gw.client.get("/metrics")).text
        sample = gw.registry.get_sample_value
        labels = {"route": "chat", "status": "200", "outcome": "hit"}
        assert sample("strata_requests_total", labels) == 1
        labels["outcome"] = "miss"
        assert sample("strata_requests_total", labels) == 2
        labels["outcome"] = "bypass"
        assert sample("strata_requests_total", labels) == 1
        assert sample("strata_cache_lookups_total", {"layer": "l1", "result": "hit"}) == 1
        assert sample("strata_cache_lookups_total", {"layer": "l2", "result": "miss"}) == 1
        assert sample("strata_engine_request_duration_seconds_count", {"route": "chat"}) == 3
    assert "# TYPE strata_requests_total counter" in text
    assert 'strata_cache_layer_up{layer="l2"} 1.0' in text


async def test_hit_body_is_exactly_the_engine_answer() -> None:
    async with gateway() as gw:
        miss = await gw.chat()
        hit = await gw.chat()
    payload = orjson.loads(hit.content)
    assert payload == orjson.loads(miss.content)
    assert payload["choices"][0]["message"]["role"] == "assistant"
    assert hit.headers["content-type"] == "application/json"
