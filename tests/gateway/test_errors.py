"""Bad input and engine failures: an OpenAI-shaped error with the right status, never a 500."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from tests.gateway.harness import CHAT, MODEL, chat_body, gateway


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    payload = response.json()
    assert set(payload) == {"error"}
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str)
    assert error["message"]
    return dict(error)


@pytest.mark.parametrize(
    ("content", "param"),
    [
        pytest.param(b"{not json", None, id="malformed-json"),
        pytest.param(b"", None, id="empty-body"),
        pytest.param(b"[1, 2]", None, id="array"),
        pytest.param(b'"text"', None, id="string"),
        pytest.param(b'{"messages": [{"role": "user", "content": "x"}]}', "model", id="no-model"),
        pytest.param(b'{"model": "strata-fake"}', "messages", id="no-messages"),
        pytest.param(b'{"model": "strata-fake", "messages": []}', "messages", id="empty-messages"),
        pytest.param(b'{"model": 7, "messages": [{"role": "user"}]}', "model", id="model-int"),
        pytest.param(
            b'{"model": "strata-fake", "messages": "hi"}', "messages", id="messages-string"
        ),
        pytest.param(
            b'{"model": "strata-fake", "messages": [{"content": "x"}]}',
            "messages[0].role",
            id="message-without-role",
        ),
        pytest.param(
            b'{"model": "strata-fake", "messages": [{"role": "user", "content": 5}]}',
            "messages[0].content",
            id="content-int",
        ),
        pytest.param(
            b'{"model": "strata-fake", "messages": [{"role": "user", "content": "x"}],'
            b' "temperature": "hot"}',
            "temperature",
            id="temperature-string",
        ),
        pytest.param(
            b'{"model": "strata-fake", "messages": [{"role": "user", "content": "x"}],'
            b' "temperature": -1}',
            "temperature",
            id="temperature-negative",
        ),
        pytest.param(
            b'{"model": "strata-fake", "messages": [{"role": "user", "content": "x"}], "n": 0}',
            "n",
            id="n-zero",
        ),
        pytest.param(
            b'{"model": "strata-fake", "messages": [{"role": "user", "content": "x"}],'
            b' "stream": "yes"}',
            "stream",
            id="stream-string",
        ),
        pytest.param(
            b'{"model": "strata-fake", "messages": [{"role": "user", "content": "x"}],'
            b' "seed": 1.5}',
            "seed",
            id="seed-float",
        ),
    ],
)
async def test_bad_bodies_are_400(content: bytes, param: str | None) -> None:
    async with gateway() as gw:
        response = await gw.client.post(
            CHAT, content=content, headers={"content-type": "application/json"}
        )
    error = assert_openai_error(response, 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert gw.engine_calls() == 0


async def test_bad_completion_prompt_is_400() -> None:
    async with gateway() as gw:
        response = await gw.client.post("/v1/completions", json={"model": MODEL, "prompt": 5})
    assert assert_openai_error(response, 400)["param"] == "prompt"


async def test_too_many_messages_is_400_before_the_engine() -> None:
    messages = [{"role": "user", "content": f"m{i}"} for i in range(6)]
    async with gateway(max_messages=5) as gw:
        reply = await gw.chat({"model": MODEL, "messages": messages, "temperature": 0})
        assert gw.engine_calls() == 0
    assert reply.status_code == 400
    assert reply.json()["error"]["code"] == "too_many_messages"
    assert reply.json()["error"]["param"] == "messages"


async def test_too_much_text_is_400_before_the_engine() -> None:
    parts = [{"type": "text", "text": "x" * 60}, {"type": "text", "text": "y" * 60}]
    async with gateway(max_content_chars=100) as gw:
        chat = await gw.chat({"model": MODEL, "messages": [{"role": "user", "content": parts}]})
        fits = await gw.chat(chat_body("x" * 100))
        prompt = await gw.client.post("/v1/completions", json={"model": MODEL, "prompt": "z" * 101})
        assert gw.engine_calls() == 1
    assert fits.status_code == 200
    for reply, param in ((chat, "messages"), (prompt, "prompt")):
        assert reply.status_code == 400
        assert reply.json()["error"]["code"] == "content_too_long"
        assert reply.json()["error"]["param"] == param


async def test_oversized_body_is_413_before_the_engine() -> None:
    async with gateway(max_body_bytes=1024) as gw:
        response = await gw.chat(chat_body("x" * 2000))
    assert assert_openai_error(response, 413)["code"] == "body_too_large"
    assert gw.engine_calls() == 0


async def test_oversized_chunked_body_is_413() -> None:
    async def chunks():  # no content-length: the limit is enforced while reading
        for _ in range(8):
            yield b"x" * 256

    async with gateway(max_body_bytes=1024) as gw:
        response = await gw.client.post(CHAT, content=chunks())
    assert_openai_error(response, 413)


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("x-strata-ttl", "soon"),
        ("x-strata-ttl", "0"),
        ("x-strata-ttl", "-5"),
        ("x-strata-ttl", "99999999999"),
        ("cache-control", "max-age=abc"),
    ],
)
async def test_bad_control_headers_are_400(header: str, value: str) -> None:
    async with gateway() as gw:
        response = await gw.chat(headers={header: value})
    error = assert_openai_error(response, 400)
    assert error["param"].lower() == header


@pytest.mark.parametrize(
    ("status", "upstream", "kind"),
    [
        (
            400,
            {
                "error": {
                    "message": "bad top_k",
                    "type": "BadRequestError",
                    "param": "top_k",
                    "code": 400,
                }
            },
            "invalid_request_error",
        ),
        (
            400,
            {
                "object": "error",
                "message": "old vllm shape",
                "type": "BadRequestError",
                "code": 400,
            },
            "invalid_request_error",
        ),
        (422, {"detail": [{"msg": "field required"}]}, "invalid_request_error"),
        (429, {"error": {"message": "slow down", "type": "rate_limit_error"}}, "rate_limit_error"),
        (
            500,
            {"error": {"message": "engine bug", "type": "InternalServerError"}},
            "InternalServerError",
        ),
    ],
)
async def test_engine_errors_keep_status_and_message(
    status: int, upstream: dict[str, Any], kind: str
) -> None:
    async with gateway() as gw:
        gw.engine.fail_next.append((status, upstream))
        response = await gw.chat()
        retry = await gw.chat()
    error = assert_openai_error(response, status)
    assert error["type"] == kind
    assert error["message"]
    # Errors are never cached: the next identical request reaches the engine and succeeds.
    assert retry.status_code == 200
    assert retry.headers["x-strata-cache"] == "miss"
    assert gw.engine_calls() == 2


async def test_unknown_model_is_404_from_the_engine() -> None:
    async with gateway() as gw:
        response = await gw.chat(chat_body(model="nope"))
    error = assert_openai_error(response, 404)
    assert error["param"] == "model"
    assert "nope" in error["message"]


async def test_unreachable_engine_is_503() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async with gateway(engine_transport=httpx.MockTransport(refuse)) as gw:
        response = await gw.chat()
        stream = await gw.chat(chat_body(stream=True))
    assert assert_openai_error(response, 503)["code"] == "engine_unavailable"
    assert_openai_error(stream, 503)


async def test_slow_engine_is_504() -> None:
    def too_slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    async with gateway(engine_transport=httpx.MockTransport(too_slow)) as gw:
        response = await gw.chat()
    assert assert_openai_error(response, 504)["code"] == "engine_timeout"


async def test_broken_engine_response_is_502() -> None:
    def broken(request: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError("peer closed connection", request=request)

    async with gateway(engine_transport=httpx.MockTransport(broken)) as gw:
        response = await gw.chat()
    assert assert_openai_error(response, 502)["code"] == "bad_gateway"


async def test_unknown_route_and_method_are_openai_shaped() -> None:
    async with gateway() as gw:
        missing = await gw.client.get("/v1/nothing")
        wrong_method = await gw.client.get(CHAT)
    assert_openai_error(missing, 404)
    assert_openai_error(wrong_method, 405)


async def test_concurrent_bad_and_good_requests_do_not_disturb_each_other() -> None:
    async with gateway() as gw:
        good, bad = await asyncio.gather(
            gw.chat(), gw.client.post(CHAT, content=b"{", headers={"content-type": "x"})
        )
    assert good.status_code == 200
    assert_openai_error(bad, 400)
