"""L3 through the gateway: served with its own headers, never across partitions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import pytest

from caches.pair_features import EMBEDDING_DIM, N_FEATURES
from caches.verifier import Network, Verifier, VerifierParams
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


def guarded_verifier(hard_guards: tuple[str, ...]) -> Verifier:
    """The real verifier with the given hard guards and a model that accepts whatever reaches it:
    only a guard (or the floor) can turn a candidate down."""
    accept_all = Network(
        w1=np.zeros((N_FEATURES, 1), np.float32),
        b1=np.zeros(1, np.float32),
        w2=np.zeros(1, np.float32),
        linear=np.zeros(N_FEATURES, np.float32),
        b2=10.0,
    )
    return Verifier(VerifierParams(accept_all, 0.5, 0.5, hard_guards))


# Identifiers that only the identifier guard catches: no leading digit (the number guard's) and
# lower case (a capitalised "#A1234" is also a name to the entity guard).
@pytest.mark.parametrize(
    ("stored", "swapped", "same"),
    [
        (
            "What is the status of batch af394c2e?",
            "What is the status of batch be70d13a?",
            "what is the status of batch AF394C2E",
        ),
        ("where is my order #a1234?", "where is my order #b9876?", "Where is my order A-1234"),
    ],
)
async def test_a_swapped_identifier_is_an_l3_miss(stored: str, swapped: str, same: str) -> None:
    verifier = guarded_verifier(VerifierParams.load().hard_guards)  # the shipped ones
    async with with_l3(verifier=verifier, dimension=EMBEDDING_DIM) as gw:
        first = await gw.chat(chat_body(stored), headers=auth())
        other = await gw.chat(chat_body(swapped), headers=auth())
        again = await gw.chat(chat_body(same), headers=auth())
    assert first.headers["x-strata-cache"] == "miss"
    assert other.headers["x-strata-cache"] == "miss"
    assert "l3;dur=" in other.headers["server-timing"]  # L3 looked, and turned it down
    assert verifier.verify(stored, swapped, 0.99, *unit_vectors()).reason == "identifier"
    # The same identifier written differently is still the same question.
    assert again.headers["x-strata-layer"] == "l3"
    assert gw.engine_calls() == 2


async def test_without_the_identifier_guard_the_swap_would_be_served() -> None:
    """The control for the test above: its questions are near enough for L3 to serve one for the
    other; the identifier guard is what stops it."""
    others = tuple(g for g in VerifierParams.load().hard_guards if g != "identifier")
    async with with_l3(verifier=guarded_verifier(others), dimension=EMBEDDING_DIM) as gw:
        await gw.chat(chat_body("What is the status of batch af394c2e?"), headers=auth())
        other = await gw.chat(chat_body("What is the status of batch be70d13a?"), headers=auth())
    assert other.headers["x-strata-layer"] == "l3"


def unit_vectors() -> tuple[np.ndarray, np.ndarray]:
    v = np.zeros(EMBEDDING_DIM, np.float32)
    v[0] = 1.0
    return v, v
