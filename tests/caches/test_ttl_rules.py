"""TTL rules: which rule decides a request's TTL, as tables."""

from __future__ import annotations

from typing import Any

import pytest

from caches.ttl_rules import TTLRule, TTLRules, query_text

DEFAULT = 3600


def chat(*messages: tuple[str, Any], model: str = "llama-3-8b") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": r, "content": c} for r, c in messages]}


def completion(prompt: Any, model: str = "llama-3-8b") -> dict[str, Any]:
    return {"model": model, "prompt": prompt}


RULES = TTLRules(
    [
        TTLRule("weather", 60, pattern=r"(?i)\bweather\b"),
        TTLRule("batch", 86_400, header="X-Job-Kind", header_value="^batch$"),
        TTLRule("debug", 5, header="x-debug"),
        TTLRule("team-a-mistral", 120, tenant="team-a", model="mistral-*"),
        TTLRule("big-model", 7200, model="llama-3-70b"),
    ],
    default_ttl=DEFAULT,
)


@pytest.mark.parametrize(
    ("route", "body", "tenant", "headers", "expected"),
    [
        pytest.param("chat", chat(("user", "hi")), "t", {}, (DEFAULT, None), id="no-rule"),
        pytest.param(
            "chat", chat(("user", "Weather in Paris?")), "t", {}, (60, "weather"), id="pattern"
        ),
        pytest.param(
            "chat",
            chat(("user", "What's the weather?"), ("assistant", "Sunny."), ("user", "Thanks")),
            "t",
            {},
            (DEFAULT, None),
            id="pattern-only-in-the-last-user-message",
        ),
        pytest.param(
            "chat",
            chat(("user", "weather?"), ("assistant", "sunny")),
            "t",
            {},
            (60, "weather"),
            id="last-user-message-before-an-assistant-turn",
        ),
        pytest.param(
            "chat",
            chat(("system", "You report the weather."), ("user", "hi")),
            "t",
            {},
            (DEFAULT, None),
            id="system-prompt-is-not-searched",
        ),
        pytest.param(
            "chat",
            chat(("user", [{"type": "text", "text": "the WEATHER"}, {"type": "image_url"}])),
            "t",
            {},
            (60, "weather"),
            id="text-parts",
        ),
        pytest.param(
            "completions", completion("weather report:"), "t", {}, (60, "weather"), id="prompt"
        ),
        pytest.param(
            "completions",
            completion(["x", "weather"]),
            "t",
            {},
            (60, "weather"),
            id="prompt-list",
        ),
        pytest.param(
            "completions", completion([1, 2, 3]), "t", {}, (DEFAULT, None), id="token-ids"
        ),
        pytest.param(
            "chat", chat(("user", "hi")), "t", {"x-job-kind": "batch"}, (86_400, "batch"),
            id="header-value",
        ),
        pytest.param(
            "chat", chat(("user", "hi")), "t", {"x-job-kind": "batched"}, (DEFAULT, None),
            id="header-value-regex-anchored",
        ),
        pytest.param(
            "chat", chat(("user", "hi")), "t", {"x-debug": ""}, (5, "debug"),
            id="header-present",
        ),
        pytest.param(
            "chat",
            chat(("user", "weather"), model="x"),
            "t",
            {"x-debug": "1"},
            (60, "weather"),
            id="first-match-wins",
        ),
        pytest.param(
            "chat", chat(("user", "hi"), model="mistral-7b"), "team-a", {}, (120, "team-a-mistral"),
            id="tenant-and-model-glob",
        ),
        pytest.param(
            "chat", chat(("user", "hi"), model="mistral-7b"), "team-b", {}, (DEFAULT, None),
            id="all-conditions-must-hold",
        ),
        pytest.param(
            "chat", chat(("user", "hi"), model="llama-3-70b"), "t", {}, (7200, "big-model"),
            id="model-exact",
        ),
        pytest.param(
            "chat", chat(("user", "hi"), model="llama-3-70b-instruct"), "t", {}, (DEFAULT, None),
            id="model-exact-is-not-a-prefix",
        ),
    ],
)  # fmt: skip
def test_choose(
    route: str,
    body: dict[str, Any],
    tenant: str,
    headers: dict[str, str],
    expected: tuple[int, str | None],
) -> None:
    assert RULES.choose(route, body, tenant, headers) == expected


def test_no_rules_is_the_default() -> None:
    assert TTLRules([], default_ttl=7).choose("chat", chat(("user", "x")), "t", {}) == (7, None)


def test_a_rule_without_conditions_matches_everything() -> None:
    rules = TTLRules([TTLRule("all", 10)], default_ttl=DEFAULT)
    assert rules.choose("completions", completion("x"), "t", {}) == (10, "all")


@pytest.mark.parametrize(
    ("route", "body", "text"),
    [
        ("chat", chat(("user", "a"), ("assistant", "b"), ("user", "c")), "c"),
        ("chat", chat(("assistant", "b")), None),
        ("chat", chat(("user", [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])),
         "a\nb"),
        ("chat", chat(("user", None)), None),
        ("chat", {"model": "m"}, None),
        ("completions", completion("p"), "p"),
        ("completions", completion(["p", "q"]), "p\nq"),
        ("completions", completion([[1, 2]]), None),
    ],
)  # fmt: skip
def test_query_text(route: str, body: dict[str, Any], text: str | None) -> None:
    assert query_text(route, body) == text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "", "ttl": 5}, "needs a name"),
        ({"name": "a", "ttl": 0}, "at least 1"),
        ({"name": "a", "ttl": 5, "pattern": "("}, "not a valid regex"),
        ({"name": "a", "ttl": 5, "header": "x", "header_value": "["}, "not a valid regex"),
        ({"name": "a", "ttl": 5, "header_value": "x"}, "needs a header"),
    ],
)
def test_bad_rules_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TTLRule(**kwargs)


def test_rule_names_are_unique_and_ttls_capped() -> None:
    with pytest.raises(ValueError, match="unique"):
        TTLRules([TTLRule("a", 1), TTLRule("a", 2)], default_ttl=DEFAULT)
    with pytest.raises(ValueError, match="max_ttl"):
        TTLRules([TTLRule("a", 100)], default_ttl=5, max_ttl=10)


def test_rules_compare_by_their_settings() -> None:
    assert TTLRule("a", 5, pattern="x") == TTLRule("a", 5, pattern="x")
    assert "_pattern" not in repr(TTLRule("a", 5, pattern="x"))
