"""The raw-ASGI completion routes behave like the rest of the app: errors, methods, schema."""

from __future__ import annotations

import httpx
import pytest
from starlette.datastructures import Headers

from gateway.errors import APIError
from gateway.fastpath import ClientGone, read_body
from tests.gateway.harness import CHAT, chat_body, gateway


async def test_other_methods_on_completion_paths_are_405() -> None:
    async with gateway() as gw:
        for method in ("GET", "PUT", "DELETE"):
            response = await gw.client.request(method, CHAT)
            assert response.status_code == 405
            assert response.headers["allow"] == "POST"
            assert response.json()["error"]["code"] == "method_not_allowed"


async def test_unexpected_error_is_an_openai_shaped_500(monkeypatch: pytest.MonkeyPatch) -> None:
    async with gateway() as gw:

        async def explode(*args: object, **kwargs: object) -> None:
            raise RuntimeError("bug")

        monkeypatch.setattr("caches.CacheChain.get", explode)
        response = await gw.chat()
    assert response.status_code == 500
    assert response.json()["error"] == {
        "message": "internal error in the gateway",
        "type": "server_error",
        "param": None,
        "code": "internal",
    }
    assert "bug" not in response.text


async def test_openapi_documents_the_completion_routes() -> None:
    async with gateway() as gw:
        schema = (await gw.client.get("/openapi.json")).json()
    for path, model in (
        ("/v1/chat/completions", "ChatCompletionRequest"),
        ("/v1/completions", "CompletionRequest"),
    ):
        post = schema["paths"][path]["post"]
        ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{model}"
        assert {"200", "400", "413", "503"} <= set(post["responses"])
    components = schema["components"]["schemas"]
    assert "ChatMessage" in components
    assert "model" in components["ChatCompletionRequest"]["required"]
    assert "/healthz" in schema["paths"]


def receiver(*messages: dict[str, object]):  # type: ignore[no-untyped-def]
    queue = list(messages)

    async def receive() -> dict[str, object]:
        return queue.pop(0)

    return receive


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([{"type": "http.request", "body": b"abc"}], b"abc"),
        (
            [
                {"type": "http.request", "body": b"ab", "more_body": True},
                {"type": "http.request", "body": b"", "more_body": True},
                {"type": "http.request", "body": b"c"},
            ],
            b"abc",
        ),
        ([{"type": "http.request"}], b""),
    ],
)
async def test_read_body_joins_chunks(messages: list[dict[str, object]], expected: bytes) -> None:
    assert await read_body(Headers(), receiver(*messages), 10) == expected


async def test_client_gone_mid_body_gets_no_answer_and_no_engine_call() -> None:
    with pytest.raises(ClientGone):
        await read_body(
            Headers(),
            receiver(
                {"type": "http.request", "body": b"{", "more_body": True},
                {"type": "http.disconnect"},
            ),
            10,
        )


async def test_declared_length_over_limit_is_refused_before_reading() -> None:
    async def never() -> dict[str, object]:
        raise AssertionError("the body must not be read")

    with pytest.raises(APIError) as info:
        await read_body(Headers({"content-length": "11"}), never, 10)
    assert info.value.status == 413


async def test_hit_through_the_fast_path_keeps_framework_routes_working() -> None:
    async with gateway() as gw:
        await gw.chat(chat_body())
        hit = await gw.chat(chat_body())
        health = await gw.client.get("/healthz")
        missing = await gw.client.post("/v1/embeddings", json={})
    assert hit.headers["x-strata-cache"] == "hit"
    assert health.status_code == 200
    assert missing.status_code == 404
    assert isinstance(missing, httpx.Response)
