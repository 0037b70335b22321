"""L3 through the gateway: served with its own headers, never across partitions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from tests.gateway.harness import Harness, chat_body, semantic_gateway

KEYS = {"team-a": "sk-team-a-0001", "team-b": "sk-team-b-0002"}
QUESTION = "how do i reset my password"
PARAPHRASE = "my password how do i reset"  # same words: cosine 1.0 with the hashing embedder


@asynccontextmanager
async def with_l3(**settings: Any) -> AsyncIterator[Harness]:
    async with semantic_gateway(api_keys=KEYS, **settings) as gw:
        yield gw


def auth(tenant: str = "team-a") -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[tenant]}"}


async def test_paraphrase_is_an_l3_hit_with_its_similarity() -> None:
    async with with_l3() as gw:
        first = await gw.chat(chat_body(QUESTION), headers=auth())
        second = await gw.chat(chat_body(PARAPHRASE), headers=auth())
    assert first.headers["x-strata-cache"] == "miss"
    assert second.headers["x-strata-cache"] == "hit"
    assert second.headers["x-strata-layer"] == "l3"
    assert float(second.headers["x-strata-similarity"]) == pytest.approx(1.0, abs=1e-3)
    assert "l3;dur=" in second.headers["server-timing"]
    assert second.content == first.content
    assert gw.engine_calls() == 1


async def test_exact_repeat_never_reaches_l3() -> None:
    async with with_l3() as gw:
        await gw.chat(chat_body(QUESTION), headers=auth())
        again = await gw.chat(chat_body(QUESTION), headers=auth())
    assert again.headers["x-strata-layer"] == "l1"
    assert "l3" not in again.headers["server-timing"]


def system(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": text}]


@pytest.mark.parametrize(
    ("first", "second", "second_tenant"),
    [
        pytest.param(
            {"messages": [*system("You are support."), {"role": "user", "content": QUESTION}]},
            {"messages": [*system("You are a pirate."), {"role": "user", "content": PARAPHRASE}]},
            "team-a", id="system-prompt",
        ),
        pytest.param({}, {}, "team-b", id="tenant"),
        pytest.param({}, {"model": "other-model"}, "team-a", id="model"),
        pytest.param({}, {"temperature": 0.3, "seed": 5}, "team-a", id="temperature-seed"),
        pytest.param({"seed": 1}, {"seed": 2}, "team-a", id="seed"),
        pytest.param(
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A"},
                          {"role": "user", "content": QUESTION}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "B"},
                          {"role": "user", "content": PARAPHRASE}]},
            "team-a", id="history",
        ),
    ],
)  # fmt: skip
async def test_no_l3_hit_across_partitions(
    first: dict[str, Any], second: dict[str, Any], second_tenant: str
) -> None:
    async with with_l3() as gw:
        gw.engine.model = "strata-fake"
        a = await gw.chat(chat_body(QUESTION, **first), headers=auth())
        body = chat_body(PARAPHRASE, **second)
        b = await gw.chat(body, headers=auth(second_tenant))
    assert a.headers["x-strata-cache"] == "miss"
    assert b.headers.get("x-strata-layer") != "l3"


async def test_ineligible_requests_skip_l3() -> None:
    tools = [{"type": "function", "function": {"name": "lookup"}}]
    async with with_l3() as gw:
        await gw.chat(chat_body(QUESTION, tools=tools), headers=auth())
        b = await gw.chat(chat_body(PARAPHRASE, tools=tools), headers=auth())
        sampled = await gw.chat(chat_body(PARAPHRASE, temperature=0.8), headers=auth())
    assert b.headers["x-strata-cache"] == "miss"
    assert "l3" not in b.headers["server-timing"]
    assert "l3" not in sampled.headers["server-timing"]


async def test_max_age_applies_to_l3() -> None:
    async with with_l3() as gw:
        await gw.chat(chat_body(QUESTION), headers=auth())
        gw.clock.advance(120)
        old = await gw.chat(
            chat_body(PARAPHRASE), headers={**auth(), "cache-control": "max-age=60"}
        )
    assert old.headers["x-strata-cache"] == "miss"
