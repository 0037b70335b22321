"""TTL rules in the flow: which TTL a stored answer gets, and the header that says why."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from caches import CachedResponse, CacheKey, CacheLayer, MemoryCache
from tests.clock import FakeClock
from tests.gateway.harness import MODEL, Harness, chat_body, gateway

RULES: list[dict[str, Any]] = [
    {"name": "weather", "ttl": 60, "pattern": r"(?i)\bweather\b"},
    {"name": "batch", "ttl": 86_400, "header": "X-Job-Kind", "header_value": "^batch$"},
    {"name": "team-a-fake", "ttl": 120, "tenant": "team-a", "model": "strata-*"},
]
KEYS = {"team-a": "sk-team-a-0001", "team-b": "sk-team-b-0002"}


class RecordingMemory(MemoryCache):
    """L1 that remembers every value written to it."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(max_entries=100, max_bytes=1 << 20, clock=clock)
        self.written: list[CachedResponse] = []

    async def set(self, key: CacheKey, value: CachedResponse) -> None:
        self.written.append(value)
        await super().set(key, value)


def recording(clock: FakeClock) -> Sequence[CacheLayer]:
    return [RecordingMemory(clock)]


def stored_ttl(gw: Harness) -> float:
    layer = gw.chain.layers[0]
    assert isinstance(layer, RecordingMemory)
    value = layer.written[-1]
    return value.expires_at - value.created_at


def auth(tenant: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[tenant]}"}


@pytest.mark.parametrize(
    ("body", "headers", "ttl", "rule"),
    [
        pytest.param(chat_body("Hello"), {}, 3600, "default", id="no-rule"),
        pytest.param(chat_body("Weather in Oslo?"), {}, 60, "weather", id="pattern"),
        pytest.param(chat_body("Hello"), {"x-job-kind": "batch"}, 86_400, "batch", id="header"),
        pytest.param(chat_body("Hello"), {"x-job-kind": "batchy"}, 3600, "default", id="value"),
        pytest.param(
            chat_body("Weather in Oslo?"), {"x-strata-ttl": "5"}, 5, "client", id="client-wins"
        ),
        pytest.param(
            chat_body("Hi", messages=[
                {"role": "user", "content": "What is the weather?"},
                {"role": "assistant", "content": "Sunny."},
                {"role": "user", "content": "Thanks!"},
            ]),
            {},
            3600,
            "default",
            id="only-the-last-user-message",
        ),
    ],
)  # fmt: skip
async def test_the_stored_ttl_and_the_rule_that_set_it(
    body: dict[str, Any], headers: dict[str, str], ttl: int, rule: str
) -> None:
    async with gateway(layers=recording, ttl_rules=RULES, default_ttl=3600) as gw:
        response = await gw.chat(body, headers=headers)
        assert response.headers["x-strata-cache"] == "miss"
        assert response.headers["x-strata-ttl-rule"] == rule
        assert stored_ttl(gw) == ttl


@pytest.mark.parametrize(
    ("tenant", "model", "rule"),
    [("team-a", MODEL, "team-a-fake"), ("team-b", MODEL, "default")],
)
async def test_tenant_and_model_conditions(tenant: str, model: str, rule: str) -> None:
    async with gateway(layers=recording, ttl_rules=RULES, api_keys=KEYS) as gw:
        response = await gw.chat(chat_body("Hello", model=model), headers=auth(tenant))
        assert response.headers["x-strata-ttl-rule"] == rule
        assert stored_ttl(gw) == (120 if rule != "default" else 3600)


async def test_the_rule_ttl_decides_when_the_entry_expires() -> None:
    body = chat_body("Weather tomorrow?")
    async with gateway(ttl_rules=RULES) as gw:
        await gw.chat(body)
        gw.clock.advance(59)
        assert (await gw.chat(body)).headers["x-strata-cache"] == "hit"
        gw.clock.advance(2)
        assert (await gw.chat(body)).headers["x-strata-cache"] == "miss"


async def test_only_cacheable_misses_say_which_rule() -> None:
    async with gateway(ttl_rules=RULES) as gw:
        await gw.chat(chat_body("Weather?"))
        hit = await gw.chat(chat_body("Weather?"))
        sampled = await gw.chat(chat_body("Weather?", temperature=0.5))
        bypass = await gw.chat(chat_body("Weather?"), headers={"cache-control": "no-store"})
    assert hit.headers["x-strata-cache"] == "hit"
    for response in (hit, sampled, bypass):
        assert "x-strata-ttl-rule" not in response.headers


async def test_a_stream_says_which_rule_before_its_body() -> None:
    body = chat_body("Weather in Rome?", stream=True)
    async with gateway(layers=recording, ttl_rules=RULES) as gw:
        async with gw.client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.headers["x-strata-ttl-rule"] == "weather"
            await response.aread()
        assert stored_ttl(gw) == 60


async def test_completions_prompt_is_matched() -> None:
    body = {"model": MODEL, "prompt": "Weather report:", "temperature": 0, "max_tokens": 8}
    async with gateway(layers=recording, ttl_rules=RULES) as gw:
        response = await gw.client.post("/v1/completions", json=body)
        assert response.headers["x-strata-ttl-rule"] == "weather"
        assert stored_ttl(gw) == 60
