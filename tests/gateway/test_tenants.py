"""Tenants: API keys, separate cache entries, and a per-tenant engine cache_salt."""

from __future__ import annotations

import httpx
import pytest

from engine.fake import FakeEngine
from engine.isolation import cache_salt
from tests.gateway.harness import chat_body, gateway

KEYS = {"team-a": "sk-team-a-0001", "team-b": "sk-team-b-0002"}


def auth(tenant: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[tenant]}"}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": "Bearer sk-unknown-0000"},
        {"authorization": "Basic sk-team-a-0001"},
        {"authorization": "Bearer "},
        {"authorization": "Bearer sk-team-a-000"},
    ],
)
async def test_keys_required_when_configured(headers: dict[str, str]) -> None:
    async with gateway(api_keys=KEYS) as gw:
        response = await gw.chat(headers=headers)
        # Authentication comes before validation: a bad body without a key is still a 401.
        bad = await gw.client.post("/v1/chat/completions", content=b"{", headers=headers)
    assert response.status_code == bad.status_code == 401
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("authentication_error", "invalid_api_key")
    assert "sk-team" not in response.text
    assert gw.engine_calls() == 0


async def test_tenants_do_not_share_cache_entries() -> None:
    async with gateway(api_keys=KEYS) as gw:
        a1 = await gw.chat(headers=auth("team-a"))
        b1 = await gw.chat(headers=auth("team-b"))
        a2 = await gw.chat(headers=auth("team-a"))
        b2 = await gw.chat(headers=auth("team-b"))
    assert (a1.headers["x-strata-cache"], b1.headers["x-strata-cache"]) == ("miss", "miss")
    assert (a2.headers["x-strata-cache"], b2.headers["x-strata-cache"]) == ("hit", "hit")
    assert gw.engine_calls() == 2


async def test_each_tenant_gets_its_own_salt_and_clients_cannot_choose_it() -> None:
    async with gateway(api_keys=KEYS, cache_salt_secret="server-secret") as gw:
        await gw.chat(chat_body(cache_salt="team-b-guess"), headers=auth("team-a"))
        await gw.chat(chat_body("other"), headers=auth("team-b"))
    sent_a, sent_b = (body["cache_salt"] for body in gw.engine.last_bodies[-2:])
    assert sent_a == cache_salt(b"server-secret", "team-a")
    assert sent_b == cache_salt(b"server-secret", "team-b")
    assert sent_a != sent_b
    assert "team-a" not in sent_a


async def test_streams_are_salted_too() -> None:
    async with gateway(cache_salt_secret="s") as gw:
        response = await gw.chat(chat_body(stream=True))
    assert response.status_code == 200
    assert gw.engine.last_bodies[-1]["cache_salt"] == cache_salt(b"s", "anonymous")


async def test_salt_is_stable_per_secret_and_differs_across_secrets() -> None:
    assert cache_salt(b"x", "t") == cache_salt(b"x", "t")
    assert cache_salt(b"x", "t") != cache_salt(b"y", "t")
    assert len(cache_salt(b"x", "t")) == 64


async def test_engine_token_counters_read_prompt_details() -> None:
    async with gateway() as gw:
        gw.engine.fail_next.append(
            (
                200,
                {
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "x"},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {
                        "prompt_tokens": 420,
                        "completion_tokens": 1,
                        "prompt_tokens_details": {"cached_tokens": 400},
                    },
                },
            )
        )
        await gw.chat()
        await gw.chat(chat_body("second"))  # the fake engine reports no details
        text = (await gw.client.get("/metrics")).text
    tokens = gw_tokens(text)
    assert tokens["strata_engine_cached_prompt_tokens_total"] == 400.0
    assert tokens["strata_engine_prompt_tokens_total"] > 420.0


def gw_tokens(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        if line.startswith("strata_engine_") and " " in line and "{" not in line:
            name, value = line.split()
            values[name] = float(value)
    return values


VLLM_METRICS = """\
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="smollm2"} 1200.0
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="smollm2"} 800.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="smollm2"} 0.25
"""


async def test_engine_prefix_cache_metrics_are_re_exported() -> None:
    fake = FakeEngine()
    asgi = httpx.ASGITransport(app=fake)

    async def route(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/metrics":
            return httpx.Response(200, text=VLLM_METRICS)
        return await asgi.handle_async_request(request)

    async with gateway(engine=fake, engine_transport=httpx.MockTransport(route)) as gw:
        text = (await gw.client.get("/metrics")).text
    assert "strata_engine_metrics_up 1.0" in text
    assert "strata_engine_prefix_cache_queries_total 1200.0" in text
    assert "strata_engine_prefix_cache_hits_total 800.0" in text
    assert "strata_engine_kv_cache_usage_ratio 0.25" in text


async def test_engine_without_metrics_is_reported_down() -> None:
    async with gateway() as gw:
        text = (await gw.client.get("/metrics")).text
    assert "strata_engine_metrics_up 0.0" in text
    assert "strata_engine_prefix_cache_hits_total" not in text
