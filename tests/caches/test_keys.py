"""Exact keys: whatever can change the engine's output changes the key; nothing else does."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from caches.base import CacheKey
from caches.keys import IGNORED_FIELDS, build_key, canonical_body

ROUTE = "/v1/chat/completions"
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
]
BASE: dict[str, Any] = {"model": "m1", "messages": MESSAGES, "temperature": 0}
TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}},
    },
}


def key(body: dict[str, Any], *, tenant: str = "t1", epoch: str = "1", route: str = ROUTE) -> str:
    return build_key(route, body, tenant=tenant, epoch=epoch).digest


def variant(**changes: Any) -> dict[str, Any]:
    """BASE with `changes` applied; a change to `...` (Ellipsis) removes the field."""
    body = copy.deepcopy(BASE)
    for name, value in changes.items():
        if value is ...:
            body.pop(name, None)
        else:
            body[name] = value
    return body


# (a, b): two bodies that must get different keys.
CHANGES_KEY = [
    pytest.param(variant(), variant(model="m2"), id="model"),
    pytest.param(
        variant(),
        variant(messages=[MESSAGES[0], {"role": "user", "content": "What is 2+3?"}]),
        id="message-content",
    ),
    pytest.param(
        variant(),
        variant(messages=[MESSAGES[0], {"role": "assistant", "content": "What is 2+2?"}]),
        id="message-role",
    ),
    pytest.param(variant(), variant(messages=MESSAGES[::-1]), id="message-order"),
    pytest.param(variant(), variant(messages=MESSAGES[1:]), id="message-dropped"),
    pytest.param(variant(temperature=0), variant(temperature=0.5), id="temperature-0-vs-0.5"),
    pytest.param(variant(), variant(top_p=0.9), id="top_p-added"),
    pytest.param(variant(top_p=0.9), variant(top_p=0.8), id="top_p-value"),
    pytest.param(variant(), variant(seed=1), id="seed-added"),
    pytest.param(variant(seed=1), variant(seed=2), id="seed-value"),
    pytest.param(variant(), variant(stop=["\n"]), id="stop-added"),
    pytest.param(variant(stop=["\n"]), variant(stop=["."]), id="stop-value"),
    pytest.param(variant(), variant(tools=[TOOL]), id="tools-added"),
    pytest.param(
        variant(tools=[TOOL]),
        variant(tools=[{**TOOL, "function": {**TOOL["function"], "name": "sub"}}]),
        id="tools-nested-value",
    ),
    pytest.param(
        variant(tools=[TOOL], tool_choice="auto"),
        variant(tools=[TOOL], tool_choice="none"),
        id="tool_choice",
    ),
    pytest.param(variant(), variant(response_format={"type": "json_object"}), id="response_format"),
    pytest.param(
        variant(response_format={"type": "json_object"}),
        variant(response_format={"type": "text"}),
        id="response_format-value",
    ),
    pytest.param(variant(), variant(logit_bias={"50256": -100}), id="logit_bias-added"),
    pytest.param(
        variant(logit_bias={"50256": -100}),
        variant(logit_bias={"50256": 100}),
        id="logit_bias-value",
    ),
    pytest.param(variant(), variant(n=2), id="n"),
    pytest.param(variant(), variant(logprobs=True), id="logprobs"),
    pytest.param(variant(logprobs=True), variant(logprobs=True, top_logprobs=3), id="top_logprobs"),
    pytest.param(variant(max_tokens=16), variant(max_tokens=32), id="max_tokens"),
    pytest.param(variant(), variant(presence_penalty=0.5), id="presence_penalty"),
    pytest.param(variant(), variant(top_k=40), id="extra-top_k"),
    pytest.param(variant(), variant(repetition_penalty=1.1), id="extra-repetition_penalty"),
    pytest.param(
        variant(),
        variant(guided_json={"type": "object", "properties": {"x": {"type": "string"}}}),
        id="extra-guided_json",
    ),
    pytest.param(
        variant(guided_json={"type": "object", "required": ["a"]}),
        variant(guided_json={"type": "object", "required": ["b"]}),
        id="extra-guided_json-nested-value",
    ),
    pytest.param(variant(), variant(some_future_param="x"), id="unknown-field"),
]

# (a, b): two bodies that must get the same key.
SAME_KEY = [
    pytest.param(variant(), variant(stream=True), id="stream"),
    pytest.param(variant(stream=False), variant(stream=True), id="stream-false-vs-true"),
    pytest.param(variant(), variant(stream_options={"include_usage": True}), id="stream_options"),
    pytest.param(variant(), variant(user="alice"), id="user"),
    pytest.param(variant(user="alice"), variant(user="bob"), id="user-value"),
    pytest.param(variant(), variant(request_id="r-1"), id="request_id"),
    pytest.param(variant(), variant(priority=5), id="priority"),
    pytest.param(variant(), variant(cache_salt="s"), id="cache_salt"),
    pytest.param(
        {"model": "m1", "messages": MESSAGES, "temperature": 0, "max_tokens": 5},
        {"max_tokens": 5, "temperature": 0, "messages": MESSAGES, "model": "m1"},
        id="top-level-key-order",
    ),
    pytest.param(
        variant(messages=[{"role": "user", "content": "hi", "name": "a"}]),
        variant(messages=[{"name": "a", "content": "hi", "role": "user"}]),
        id="message-key-order",
    ),
    pytest.param(
        variant(
            response_format={"type": "json_schema", "json_schema": {"name": "x", "strict": True}}
        ),
        variant(
            response_format={"json_schema": {"strict": True, "name": "x"}, "type": "json_schema"}
        ),
        id="nested-key-order",
    ),
    pytest.param(variant(), variant(seed=None), id="null-seed"),
    pytest.param(variant(), variant(stop=None, tools=None, top_p=None), id="null-several"),
    pytest.param(variant(temperature=0), variant(temperature=0.0), id="temperature-0-vs-0.0"),
    pytest.param(variant(top_p=1), variant(top_p=1.0), id="top_p-1-vs-1.0"),
    pytest.param(
        variant(repetition_penalty=1),
        variant(repetition_penalty=1.0),
        id="repetition_penalty-1-vs-1.0",
    ),
]


@pytest.mark.parametrize(("a", "b"), CHANGES_KEY)
def test_field_changes_key(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert key(a) != key(b)


@pytest.mark.parametrize(("a", "b"), SAME_KEY)
def test_field_does_not_change_key(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert key(a) == key(b)


@pytest.mark.parametrize(
    "context",
    [
        pytest.param({"tenant": "t2"}, id="tenant"),
        pytest.param({"epoch": "2"}, id="epoch"),
        pytest.param({"route": "/v1/completions"}, id="route"),
    ],
)
def test_key_material_outside_the_body_changes_key(context: dict[str, str]) -> None:
    assert key(BASE) != key(BASE, **context)


def test_key_carries_its_material_in_the_clear() -> None:
    built = build_key(ROUTE, BASE, tenant="t1", epoch="1")
    assert built == CacheKey(digest=built.digest, tenant="t1", model="m1", route=ROUTE)
    assert len(built.digest) == 64
    assert int(built.digest, 16) >= 0  # hex


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"messages": MESSAGES}, id="absent"),
        pytest.param({"model": None, "messages": MESSAGES}, id="null"),
        pytest.param({"model": 7, "messages": MESSAGES}, id="not-a-string"),
    ],
)
def test_key_model_is_empty_when_the_body_has_no_string_model(body: dict[str, Any]) -> None:
    assert build_key(ROUTE, body, tenant="t", epoch="1").model == ""


def test_canonical_body_drops_ignored_fields_and_nulls_and_normalises_floats() -> None:
    body = {
        **dict.fromkeys(IGNORED_FIELDS, "x"),
        "model": "m",
        "seed": None,
        "temperature": 0,
        "top_k": 0,
        "logprobs": True,
    }
    canonical = canonical_body(body)
    assert canonical == {"model": "m", "temperature": 0.0, "top_k": 0, "logprobs": True}
    assert type(canonical["temperature"]) is float
    assert type(canonical["top_k"]) is int  # not a float field: left alone


def test_canonical_body_does_not_touch_its_input() -> None:
    body = variant(stream=True, seed=None)
    before = copy.deepcopy(body)
    canonical_body(body)
    assert body == before


# --- property: canonical forms decide the digest, both ways ---------------------------------------

# JSON values as the gateway's parser (orjson) produces them: 64-bit integers, finite floats.
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
field_names = st.sampled_from(
    ["model", "messages", "temperature", "top_p", "seed", "stop", "n", "top_k", *IGNORED_FIELDS]
) | st.text(max_size=6)
bodies = st.dictionaries(field_names, json_values, max_size=6)


def tagged(value: Any) -> Any:
    """`value` with every scalar's JSON type made explicit, so that 1, 1.0, True and -0.0 / 0.0
    compare unequal (Python's `==` would call them equal; their JSON texts differ)."""
    if isinstance(value, dict):
        return ("object", sorted((k, tagged(v)) for k, v in value.items()))
    if isinstance(value, list):
        return ("array", [tagged(v) for v in value])
    if isinstance(value, float):
        return ("float", value.hex())
    return (type(value).__name__, value)


@st.composite
def body_pairs(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    """A body and a near neighbour, so that equal canonical forms come up often."""
    a = draw(bodies)
    b = dict(a)
    edit = draw(st.sampled_from(["same", "reorder", "set", "drop", "null", "ignored"]))
    if edit == "reorder":
        b = dict(reversed(list(a.items())))
    elif edit == "set":
        b[draw(field_names)] = draw(json_values)
    elif edit == "drop" and a:
        b.pop(draw(st.sampled_from(sorted(a))))
    elif edit == "null":
        b[draw(field_names)] = None
    elif edit == "ignored":
        b[draw(st.sampled_from(sorted(IGNORED_FIELDS)))] = draw(json_values)
    return a, b


@given(body_pairs(), st.sampled_from(["t1", "t2"]), st.sampled_from(["t1", "t2"]))
def test_digest_is_equal_exactly_when_canonical_forms_are(
    pair: tuple[dict[str, Any], dict[str, Any]], tenant_a: str, tenant_b: str
) -> None:
    a, b = pair
    same_material = tagged(canonical_body(a)) == tagged(canonical_body(b)) and tenant_a == tenant_b
    assert (key(a, tenant=tenant_a) == key(b, tenant=tenant_b)) == same_material
