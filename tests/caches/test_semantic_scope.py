"""Partitions: two requests may match only when everything but the last question is identical."""

from __future__ import annotations

from typing import Any

import pytest

from caches.semantic_scope import SemanticScope, semantic_scope


def body(question: str = "How do I reset my password?", **over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": "m",
        "temperature": 0,
        "messages": [
            {"role": "system", "content": "You are support."},
            {"role": "user", "content": question},
        ],
    }
    base.update(over)
    return base


def scope(b: dict[str, Any], tenant: str = "t", epoch: str = "1") -> SemanticScope:
    found = semantic_scope("chat", b, tenant=tenant, epoch=epoch, max_chars=200)
    assert isinstance(found, SemanticScope), found
    return found


def test_question_is_the_last_user_message_and_not_in_the_partition() -> None:
    a, b = scope(body("How do I reset my password?")), scope(body("password reset steps?"))
    assert a.text == "How do I reset my password?"
    assert a.partition == b.partition


@pytest.mark.parametrize(
    ("other", "tenant", "epoch"),
    [
        pytest.param(body(model="other"), "t", "1", id="model"),
        pytest.param(body(temperature=0.2, seed=1), "t", "1", id="temperature"),
        pytest.param(body(seed=7), "t", "1", id="seed"),
        pytest.param(body(max_tokens=5), "t", "1", id="max_tokens"),
        pytest.param(body(top_k=3), "t", "1", id="engine-extra"),
        pytest.param(body(response_format={"type": "json_object"}), "t", "1", id="format"),
        pytest.param(
            body(messages=[{"role": "system", "content": "You are a pirate."},
                           {"role": "user", "content": "How do I reset my password?"}]),
            "t", "1", id="system-prompt",
        ),
        pytest.param(
            body(messages=[{"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello!"},
                           {"role": "user", "content": "How do I reset my password?"}]),
            "t", "1", id="history",
        ),
        pytest.param(body(), "other-tenant", "1", id="tenant"),
        pytest.param(body(), "t", "2", id="epoch"),
    ],
)  # fmt: skip
def test_anything_else_changes_the_partition(
    other: dict[str, Any], tenant: str, epoch: str
) -> None:
    assert scope(other, tenant, epoch).partition != scope(body()).partition


def test_stream_flag_does_not_change_the_partition() -> None:
    assert scope(body(stream=True)).partition == scope(body()).partition


@pytest.mark.parametrize(
    ("b", "route", "reason"),
    [
        (body(tools=[{"type": "function", "function": {"name": "f"}}]), "chat", "tools"),
        (body(messages=[{"role": "user", "content": "x"},
                        {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
                        {"role": "tool", "content": "42"},
                        {"role": "user", "content": "and?"}]), "chat", "tools"),
        (body(messages=[{"role": "user", "content": [{"type": "text", "text": "x"}]}]), "chat",
         "non-text"),
        (body(messages=[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]),
         "chat", "no-user-message"),
        (body(messages=[{"role": "user", "content": "   "}]), "chat", "no-user-message"),
        (body("x" * 201), "chat", "too-long"),
        ({"model": "m", "prompt": "hi", "temperature": 0}, "completions", "route"),
    ],
)  # fmt: skip
def test_ineligible_requests_name_their_reason(b: dict[str, Any], route: str, reason: str) -> None:
    assert semantic_scope(route, b, tenant="t", epoch="1", max_chars=200) == reason
