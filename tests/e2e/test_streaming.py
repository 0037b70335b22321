"""Streaming through `strata serve` with the official OpenAI SDK, fake-engine processes, real Redis.

Every test asks its own question, so the processes can be shared across the module.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.procs import Process, fake_engine, gateway_process, running
from tests.redisproc import RedisServer

pytestmark = pytest.mark.e2e

MODEL = "strata-fake"
TOOLS: Any = [
    {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
]


@pytest.fixture(scope="module")
def engine() -> Iterator[Process]:
    with fake_engine("--answer-bytes", "600") as proc:
        yield proc


@pytest.fixture(scope="module")
def gateway(engine: Process, redis_server: RedisServer) -> Iterator[Process]:
    redis_server.start()
    with running(
        gateway_process(engine.url, redis_server.url, f"e2e-{uuid.uuid4().hex[:8]}")
    ) as gw:
        yield gw


def sdk(gw: Process) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def question() -> list[Any]:
    return [{"role": "user", "content": f"Tell me about streams ({uuid.uuid4().hex})"}]


def engine_stats(engine: Process) -> dict[str, Any]:
    stats: dict[str, Any] = httpx.get(engine.url + "/fake/stats", timeout=5).json()
    return stats


def stream(client: openai.OpenAI, messages: list[Any], **params: Any) -> tuple[str, list[Any]]:
    """The X-Strata-Cache header and every chunk of one streamed chat completion."""
    params.setdefault("temperature", 0)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, stream=True, **params
    )
    return raw.headers["x-strata-cache"], list(raw.parse())


def text_of(chunks: list[Any]) -> str:
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


def test_stream_miss_then_hit_with_identical_text(gateway: Process, engine: Process) -> None:
    client = sdk(gateway)
    messages = question()
    before = engine_stats(engine)["calls"].get("/v1/chat/completions", 0)
    first_cache, first = stream(client, messages)
    second_cache, second = stream(client, messages)
    assert (first_cache, second_cache) == ("miss", "hit")
    assert len(second) > 10  # many deltas, not one blob
    assert text_of(second) == text_of(first)
    assert len(text_of(first)) >= 500
    assert second[-1].choices[0].finish_reason == "stop"
    assert {c.id for c in second} == {first[0].id}
    assert engine_stats(engine)["calls"]["/v1/chat/completions"] == before + 1
    # The same entry answers a plain request, with the same text.
    plain = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, temperature=0
    )
    assert plain.headers["x-strata-cache"] == "hit"
    assert plain.parse().choices[0].message.content == text_of(first)


def test_include_usage_gives_the_usage_chunk(gateway: Process) -> None:
    client = sdk(gateway)
    messages = question()
    options: Any = {"include_usage": True}
    for expected in ("miss", "hit"):
        cache, chunks = stream(client, messages, stream_options=options)
        assert cache == expected
        usage_chunk = chunks[-1]
        assert usage_chunk.choices == []
        assert usage_chunk.usage is not None
        assert usage_chunk.usage.completion_tokens > 0
        assert all(chunk.usage is None for chunk in chunks[:-1])


async def test_async_sdk_streams_and_replays(gateway: Process) -> None:
    messages = question()
    async with openai.AsyncOpenAI(
        base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=30
    ) as client:
        texts = []
        for expected in ("miss", "hit"):
            raw = await client.chat.completions.with_raw_response.create(
                model=MODEL, messages=messages, temperature=0, stream=True
            )
            assert raw.headers["x-strata-cache"] == expected
            parts = [c.choices[0].delta.content or "" async for c in raw.parse() if c.choices]
            texts.append("".join(parts))
        completions = []
        for _ in range(2):
            completion = await client.completions.create(
                model=MODEL, prompt=f"Once {uuid.uuid4().hex[:4]}", temperature=0, stream=True
            )
            completions.append("".join([c.choices[0].text async for c in completion]))
    assert texts[0] == texts[1]
    assert texts[0]
    assert completions[0]


def test_tool_call_deltas_replay_to_the_same_arguments(gateway: Process) -> None:
    client = sdk(gateway)
    messages = question()

    def arguments(chunks: list[Any]) -> tuple[str, str, str]:
        call_id = name = args = ""
        for chunk in chunks:
            for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                call_id += call.id or ""
                name += (call.function.name or "") if call.function else ""
                args += (call.function.arguments or "") if call.function else ""
        return call_id, name, args

    first_cache, first = stream(client, messages, tools=TOOLS)
    second_cache, second = stream(client, messages, tools=TOOLS)
    assert (first_cache, second_cache) == ("miss", "hit")
    assert arguments(second) == arguments(first)
    assert arguments(first)[1] == "lookup"
    assert "query" in arguments(first)[2]
    assert second[-1].choices[0].finish_reason == "tool_calls"


def test_engine_cut_mid_stream_is_an_error_and_stores_nothing(redis_server: RedisServer) -> None:
    redis_server.start()
    with (
        fake_engine("--answer-bytes", "600", "--break-stream-after", "3") as cutting,
        running(
            gateway_process(cutting.url, redis_server.url, f"e2e-{uuid.uuid4().hex[:8]}")
        ) as gw,
    ):
        client = sdk(gw)
        messages = question()
        for _ in range(2):
            received: list[Any] = []
            chunks = client.chat.completions.create(
                model=MODEL, messages=messages, temperature=0, stream=True
            )
            with pytest.raises(openai.APIError):
                received.extend(chunks)
            assert len(received) == 4  # the role chunk and three deltas, then the error event
        # Nothing was stored: the second identical request went to the engine again.
        assert engine_stats(cutting)["calls"]["/v1/chat/completions"] == 2


def test_client_disconnect_cancels_the_engine_and_stores_nothing(
    redis_server: RedisServer,
) -> None:
    redis_server.start()
    with (
        fake_engine("--answer-bytes", "4000", "--chunk-delay", "0.05") as slow,
        running(gateway_process(slow.url, redis_server.url, f"e2e-{uuid.uuid4().hex[:8]}")) as gw,
    ):
        client = sdk(gw)
        messages = question()
        chunks = client.chat.completions.create(
            model=MODEL, messages=messages, temperature=0, stream=True
        )
        for number, _ in enumerate(chunks, 1):
            if number == 3:
                break
        chunks.close()
        deadline = time.monotonic() + 15
        while engine_stats(slow)["cancelled"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = engine_stats(slow)
        assert stats["cancelled"] == 1
        assert stats["completed_streams"] == 0
        again = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages, temperature=0, stream=True
        )
        assert again.headers["x-strata-cache"] == "miss"
        again.http_response.close()
