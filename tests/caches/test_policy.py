"""Policy: what is looked up, what is stored, and what the client's headers ask for."""

from __future__ import annotations

from typing import Any

import pytest

from caches.policy import (
    NO_CONTROL,
    CacheControl,
    ControlError,
    Decision,
    decide,
    is_deterministic,
    parse_cache_control,
    storable,
    usage_tokens,
)
from config.settings import FINISH_REASONS

MAX_TTL = 86_400
MESSAGES = [{"role": "user", "content": "hi"}]


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": MESSAGES, **fields}


CACHED = Decision(lookup=True, store=True)

# --- decide -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_body", "control", "enabled", "expected"),
    [
        pytest.param(body(temperature=0), NO_CONTROL, True, CACHED, id="temperature-0"),
        pytest.param(body(temperature=0.0), NO_CONTROL, True, CACHED, id="temperature-0.0"),
        pytest.param(body(temperature=0.7, seed=42), NO_CONTROL, True, CACHED, id="seed"),
        pytest.param(body(seed=0), NO_CONTROL, True, CACHED, id="seed-0-no-temperature"),
        pytest.param(body(temperature=0, n=1), NO_CONTROL, True, CACHED, id="n-1"),
        pytest.param(body(temperature=0, n=None), NO_CONTROL, True, CACHED, id="n-null"),
        pytest.param(
            body(temperature=0, stream=False), NO_CONTROL, True, CACHED, id="stream-false"
        ),
        pytest.param(
            body(temperature=0.7),
            NO_CONTROL,
            True,
            Decision(False, False, "nondeterministic"),
            id="temperature-0.7-no-seed",
        ),
        pytest.param(
            body(),
            NO_CONTROL,
            True,
            Decision(False, False, "nondeterministic"),
            id="no-temperature-no-seed",  # the engine's default temperature is not 0
        ),
        pytest.param(
            body(temperature=0.7, seed=None),
            NO_CONTROL,
            True,
            Decision(False, False, "nondeterministic"),
            id="seed-null",
        ),
        pytest.param(
            body(temperature=0, n=2), NO_CONTROL, True, Decision(False, False, "n>1"), id="n-2"
        ),
        # Streams are cached like any answer: reassembled on the way in, replayed on the way out.
        pytest.param(body(temperature=0, stream=True), NO_CONTROL, True, CACHED, id="stream"),
        pytest.param(
            body(temperature=0.7, stream=True),
            NO_CONTROL,
            True,
            Decision(False, False, "nondeterministic"),
            id="sampled-stream",
        ),
        pytest.param(
            body(temperature=0),
            CacheControl(no_store=True),
            True,
            Decision(False, False, "no-store"),
            id="no-store",
        ),
        pytest.param(
            body(temperature=0),
            CacheControl(no_cache=True),
            True,
            Decision(False, True, "no-cache"),
            id="no-cache",
        ),
        pytest.param(
            body(temperature=0),
            CacheControl(no_cache=True, no_store=True),
            True,
            Decision(False, False, "no-store"),
            id="no-cache-and-no-store",
        ),
        pytest.param(
            body(temperature=0.7),
            CacheControl(no_cache=True),
            True,
            Decision(False, False, "nondeterministic"),
            id="no-cache-does-not-make-sampling-storable",
        ),
        pytest.param(
            body(temperature=0), CacheControl(max_age=10), True, CACHED, id="max-age-still-looks-up"
        ),
        pytest.param(
            body(temperature=0),
            NO_CONTROL,
            False,
            Decision(False, False, "disabled"),
            id="disabled",
        ),
    ],
)
def test_decide(
    request_body: dict[str, Any], control: CacheControl, enabled: bool, expected: Decision
) -> None:
    assert decide(request_body, control, enabled=enabled) == expected


@pytest.mark.parametrize(
    ("request_body", "expected"),
    [
        pytest.param(body(temperature=0), True, id="temperature-0"),
        pytest.param(body(seed=7), True, id="seed"),
        pytest.param(body(temperature=1), False, id="temperature-1"),
        pytest.param(body(temperature=None), False, id="temperature-null"),
        pytest.param(body(), False, id="nothing"),
    ],
)
def test_is_deterministic(request_body: dict[str, Any], expected: bool) -> None:
    assert is_deterministic(request_body) is expected


# --- parse_cache_control ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cache_control", "ttl", "expected"),
    [
        pytest.param(None, None, NO_CONTROL, id="no-headers"),
        pytest.param("", None, NO_CONTROL, id="empty-cache-control"),
        pytest.param("no-cache", None, CacheControl(no_cache=True), id="no-cache"),
        pytest.param("no-store", None, CacheControl(no_store=True), id="no-store"),
        pytest.param("max-age=60", None, CacheControl(max_age=60), id="max-age"),
        pytest.param("max-age=0", None, CacheControl(max_age=0), id="max-age-0"),
        pytest.param('max-age="60"', None, CacheControl(max_age=60), id="max-age-quoted"),
        pytest.param("max-age = 60", None, CacheControl(max_age=60), id="max-age-spaces"),
        pytest.param(
            "no-cache, no-store", None, CacheControl(no_cache=True, no_store=True), id="combo"
        ),
        pytest.param(
            "no-cache,max-age=5", None, CacheControl(no_cache=True, max_age=5), id="combo-no-space"
        ),
        pytest.param("NO-CACHE", None, CacheControl(no_cache=True), id="upper-case"),
        pytest.param(
            "No-Store, Max-Age=3", None, CacheControl(no_store=True, max_age=3), id="mixed-case"
        ),
        pytest.param(
            "only-if-cached, no-transform", None, NO_CONTROL, id="other-directives-ignored"
        ),
        pytest.param("no-cache,", None, CacheControl(no_cache=True), id="trailing-comma"),
        pytest.param(None, "60", CacheControl(ttl=60), id="ttl"),
        pytest.param(None, " 60 ", CacheControl(ttl=60), id="ttl-spaces"),
        pytest.param(None, "1", CacheControl(ttl=1), id="ttl-min"),
        pytest.param(None, str(MAX_TTL), CacheControl(ttl=MAX_TTL), id="ttl-max"),
        pytest.param(
            "no-cache", "120", CacheControl(no_cache=True, ttl=120), id="ttl-with-cache-control"
        ),
    ],
)
def test_parse_cache_control(
    cache_control: str | None, ttl: str | None, expected: CacheControl
) -> None:
    assert parse_cache_control(cache_control, ttl, max_ttl=MAX_TTL) == expected


@pytest.mark.parametrize(
    ("cache_control", "ttl", "header"),
    [
        pytest.param("max-age=", None, "Cache-Control", id="max-age-empty"),
        pytest.param("max-age", None, "Cache-Control", id="max-age-no-value"),
        pytest.param("max-age=-1", None, "Cache-Control", id="max-age-negative"),
        pytest.param("max-age=1.5", None, "Cache-Control", id="max-age-fraction"),
        pytest.param("max-age=ten", None, "Cache-Control", id="max-age-word"),
        pytest.param("max-age=+5", None, "Cache-Control", id="max-age-plus"),
        pytest.param("max-age=\u0665", None, "Cache-Control", id="max-age-non-ascii-digit"),
        pytest.param(None, "", "X-Strata-TTL", id="ttl-empty"),
        pytest.param(None, "abc", "X-Strata-TTL", id="ttl-word"),
        pytest.param(None, "-5", "X-Strata-TTL", id="ttl-negative"),
        pytest.param(None, "2.5", "X-Strata-TTL", id="ttl-fraction"),
        pytest.param(None, "0", "X-Strata-TTL", id="ttl-zero"),
        pytest.param(None, str(MAX_TTL + 1), "X-Strata-TTL", id="ttl-over-max"),
        pytest.param("no-cache", "0", "X-Strata-TTL", id="ttl-zero-with-cache-control"),
    ],
)
def test_parse_cache_control_rejects(
    cache_control: str | None, ttl: str | None, header: str
) -> None:
    with pytest.raises(ControlError) as info:
        parse_cache_control(cache_control, ttl, max_ttl=MAX_TTL)
    assert info.value.header == header
    assert isinstance(info.value, ValueError)
    assert header in str(info.value)


# --- storable ---------------------------------------------------------------------------------


def answer(*finish_reasons: str | None) -> dict[str, Any]:
    return {
        "object": "chat.completion",
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": "4"}, "finish_reason": reason}
            for i, reason in enumerate(finish_reasons)
        ],
    }


@pytest.mark.parametrize(
    ("status", "payload", "expected"),
    [
        pytest.param(200, answer("stop"), True, id="stop"),
        pytest.param(200, answer("length"), True, id="length"),
        pytest.param(200, answer("tool_calls"), True, id="tool_calls"),
        pytest.param(200, answer("stop", "length"), True, id="two-complete-choices"),
        pytest.param(429, answer("stop"), False, id="429"),
        pytest.param(500, answer("stop"), False, id="500"),
        pytest.param(201, answer("stop"), False, id="201"),
        pytest.param(200, {"object": "chat.completion"}, False, id="missing-choices"),
        pytest.param(200, {"choices": []}, False, id="empty-choices"),
        pytest.param(200, {"choices": None}, False, id="null-choices"),
        pytest.param(
            200, {"choices": {"0": {"finish_reason": "stop"}}}, False, id="choices-not-list"
        ),
        pytest.param(200, {"choices": ["stop"]}, False, id="choice-not-object"),
        pytest.param(200, answer(None), False, id="finish_reason-null"),
        pytest.param(200, answer("content_filter"), False, id="content_filter"),
        pytest.param(200, answer("abort"), False, id="abort"),
        pytest.param(200, answer("stop", None), False, id="one-unfinished-choice"),
        pytest.param(200, {"choices": [{"index": 0}]}, False, id="finish_reason-missing"),
        pytest.param(200, [answer("stop")], False, id="list-payload"),
        pytest.param(200, "stop", False, id="string-payload"),
        pytest.param(200, None, False, id="null-payload"),
    ],
)
def test_storable(status: int, payload: Any, expected: bool) -> None:
    assert storable(status, payload, FINISH_REASONS) is expected


def test_storable_honours_the_configured_reasons() -> None:
    assert storable(200, answer("stop"), frozenset({"stop"}))
    assert not storable(200, answer("length"), frozenset({"stop"}))


# --- usage_tokens -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        pytest.param({"usage": {"prompt_tokens": 12, "completion_tokens": 3}}, (12, 3), id="both"),
        pytest.param({"usage": {"prompt_tokens": 0, "completion_tokens": 0}}, (0, 0), id="zeros"),
        pytest.param({"usage": {"prompt_tokens": 12}}, (12, 0), id="prompt-only"),
        pytest.param({"usage": {"completion_tokens": 3}}, (0, 3), id="completion-only"),
        pytest.param({}, (0, 0), id="no-usage"),
        pytest.param({"usage": None}, (0, 0), id="usage-null"),
        pytest.param({"usage": [12, 3]}, (0, 0), id="usage-not-object"),
        pytest.param(
            {"usage": {"prompt_tokens": -1, "completion_tokens": -2}}, (0, 0), id="negative"
        ),
        pytest.param(
            {"usage": {"prompt_tokens": "12", "completion_tokens": 3.0}}, (0, 0), id="wrong-types"
        ),
        pytest.param(
            {"usage": {"prompt_tokens": None, "completion_tokens": None}}, (0, 0), id="nulls"
        ),
    ],
)
def test_usage_tokens(payload: dict[str, Any], expected: tuple[int, int]) -> None:
    assert usage_tokens(payload) == expected


def test_usage_tokens_rejects_booleans() -> None:
    counts = usage_tokens({"usage": {"prompt_tokens": True, "completion_tokens": False}})
    assert counts == (0, 0)
    assert all(type(n) is int for n in counts)
