"""Streams through the real app: relayed live, stored only when whole, replayed as events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from engine.fake import FakeEngine
from tests.gateway.harness import CHAT, COMPLETIONS, MODEL, chat_body, gateway
from tests.gateway.test_semantic_flow import PARAPHRASE, QUESTION, auth, with_l3

TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]


def chunks_of(response: httpx.Response) -> tuple[list[dict[str, Any]], bool]:
    """The JSON chunks of an SSE body, and whether it ended with `data: [DONE]`."""
    assert response.headers["content-type"].startswith("text/event-stream")
    data = [block[len("data: ") :] for block in response.text.split("\n\n") if block]
    done = bool(data) and data[-1] == "[DONE]"
    return [orjson.loads(d) for d in data if d != "[DONE]"], done


def chat_text(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def tool_arguments(chunks: list[dict[str, Any]]) -> dict[int, dict[str, str]]:
    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            for call in choice["delta"].get("tool_calls") or []:
                entry = calls.setdefault(call["index"], {"id": "", "name": "", "arguments": ""})
                entry["id"] += call.get("id") or ""
                entry["name"] += (call.get("function") or {}).get("name") or ""
                entry["arguments"] += (call.get("function") or {}).get("arguments") or ""
    return calls


async def test_a_stream_miss_is_relayed_and_its_repeat_replayed_from_l1() -> None:
    body = chat_body(stream=True)
    async with gateway(engine=FakeEngine(model=MODEL, answer_bytes=600)) as gw:
        first = await gw.chat(body)
        second = await gw.chat(body)
    assert first.headers["x-strata-cache"] == "miss"
    assert "x-strata-cache-reason" not in first.headers
    assert (second.headers["x-strata-cache"], second.headers["x-strata-layer"]) == ("hit", "l1")
    assert second.headers["age"] == "0"
    live, live_done = chunks_of(first)
    replayed, replay_done = chunks_of(second)
    assert live_done
    assert replay_done
    assert chat_text(replayed) == chat_text(live)
    assert len(chat_text(live)) >= 500
    assert {(c["id"], c["created"], c["model"]) for c in replayed} == {
        (live[0]["id"], live[0]["created"], MODEL)
    }
    assert replayed[-1]["choices"][0]["finish_reason"] == "stop"
    assert gw.engine_calls() == 1


async def test_streamed_and_plain_requests_share_one_entry_both_ways() -> None:
    async with gateway() as gw:
        streamed = await gw.chat(chat_body("first question", stream=True))
        plain_hit = await gw.chat(chat_body("first question"))
        plain = await gw.chat(chat_body("second question"))
        streamed_hit = await gw.chat(chat_body("second question", stream=True))
        expected = gw.engine.answer(gw.engine.last_bodies[0], chat=True)
    assert plain_hit.headers["x-strata-cache"] == streamed_hit.headers["x-strata-cache"] == "hit"
    answer = plain_hit.json()
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"] == expected["choices"][0]["message"]
    # The client did not ask for usage; the gateway did, so the stored answer has it.
    assert answer["usage"] == expected["usage"]
    assert answer["id"] == chunks_of(streamed)[0][0]["id"]
    replayed, _ = chunks_of(streamed_hit)
    assert chat_text(replayed) == plain.json()["choices"][0]["message"]["content"]
    assert gw.engine_calls() == 2


async def test_usage_the_gateway_asked_for_is_hidden_from_the_client() -> None:
    async with gateway() as gw:
        response = await gw.chat(chat_body(stream=True))
        sent = gw.engine.last_bodies[-1]
    assert sent["stream_options"] == {"include_usage": True}
    chunks, done = chunks_of(response)
    assert done
    assert all(chunk["choices"] for chunk in chunks)
    assert all("usage" not in chunk for chunk in chunks)


@pytest.mark.parametrize("cached", [False, True], ids=["miss", "hit"])
async def test_include_usage_gives_the_usage_chunk(cached: bool) -> None:
    body = chat_body(stream=True, stream_options={"include_usage": True})
    async with gateway() as gw:
        response = await gw.chat(body)
        if cached:
            response = await gw.chat(body)
        expected = gw.engine.answer(gw.engine.last_bodies[0], chat=True)["usage"]
    assert response.headers["x-strata-cache"] == ("hit" if cached else "miss")
    chunks, done = chunks_of(response)
    assert done
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == expected


async def test_other_stream_options_go_upstream_untouched() -> None:
    options = {"include_usage": False, "continuous_usage_stats": True}
    async with gateway() as gw:
        await gw.chat(chat_body(stream=True, stream_options=options))
        sent = gw.engine.last_bodies[-1]
        again = await gw.chat(chat_body(stream=True, stream_options=options))
        plain = await gw.chat(chat_body())
    assert sent["stream_options"] == options
    assert again.headers["x-strata-cache"] == "hit"
    assert "usage" not in plain.json()  # stored as the stream carried it: without usage


async def test_tool_call_deltas_round_trip_through_the_cache() -> None:
    body = chat_body(stream=True, tools=TOOLS)
    async with gateway() as gw:
        live = await gw.chat(body)
        replay = await gw.chat(body)
        plain = await gw.chat(chat_body(tools=TOOLS))
        expected = gw.engine.answer(gw.engine.last_bodies[0], chat=True)
    assert replay.headers["x-strata-cache"] == plain.headers["x-strata-cache"] == "hit"
    live_calls = tool_arguments(chunks_of(live)[0])
    replayed = chunks_of(replay)[0]
    assert tool_arguments(replayed) == live_calls
    call = expected["choices"][0]["message"]["tool_calls"][0]
    assert live_calls[0] == {
        "id": call["id"],
        "name": call["function"]["name"],
        "arguments": call["function"]["arguments"],
    }
    assert orjson.loads(live_calls[0]["arguments"]) == orjson.loads(call["function"]["arguments"])
    assert replayed[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert plain.json()["choices"][0]["message"]["tool_calls"] == [call]


async def test_completions_streams_are_cached_and_replayed() -> None:
    body = {"model": MODEL, "prompt": "Once upon a time", "temperature": 0, "max_tokens": 30,
            "stream": True}  # fmt: skip
    async with gateway(engine=FakeEngine(model=MODEL, answer_bytes=400)) as gw:
        first = await gw.client.post(COMPLETIONS, json=body)
        second = await gw.client.post(COMPLETIONS, json=body)
        plain = await gw.client.post(COMPLETIONS, json={**body, "stream": False})
        calls = gw.engine_calls(COMPLETIONS)
    live, replayed = chunks_of(first)[0], chunks_of(second)[0]
    assert (first.headers["x-strata-cache"], second.headers["x-strata-cache"]) == ("miss", "hit")
    assert all(chunk["object"] == "text_completion" for chunk in live + replayed)
    text = "".join(c["choices"][0]["text"] for c in live)
    assert "".join(c["choices"][0]["text"] for c in replayed) == text
    assert replayed[-1]["choices"][0]["finish_reason"] == "length"
    assert plain.json()["choices"][0]["text"] == text
    assert calls == 1


async def test_sampled_and_no_store_streams_are_relayed_untouched() -> None:
    async with gateway() as gw:
        sampled = [await gw.chat(chat_body(stream=True, temperature=0.8)) for _ in range(2)]
        no_store = await gw.chat(chat_body(stream=True), headers={"cache-control": "no-store"})
        bodies = gw.engine.last_bodies[-3:]
        after = await gw.chat(chat_body(stream=True))
    assert [r.headers["x-strata-cache"] for r in sampled] == ["miss", "miss"]
    assert sampled[0].headers["x-strata-cache-reason"] == "nondeterministic"
    assert chat_text(chunks_of(sampled[0])[0]) != chat_text(chunks_of(sampled[1])[0])
    assert no_store.headers["x-strata-cache"] == "bypass"
    assert all("stream_options" not in sent for sent in bodies)  # nothing added upstream
    assert after.headers["x-strata-cache"] == "miss"  # no-store stored nothing
    assert gw.engine_calls() == 4


async def test_stream_outcomes_and_engine_time_are_counted() -> None:
    async with gateway() as gw:
        await gw.chat(chat_body(stream=True))
        await gw.chat(chat_body(stream=True))
        await gw.chain.settle()  # L2's write happens in the background
        sample = gw.registry.get_sample_value
        labels = {"route": "chat", "status": "200", "outcome": "miss"}
        assert sample("strata_requests_total", labels) == 1
        assert sample("strata_requests_total", {**labels, "outcome": "hit"}) == 1
        assert sample("strata_engine_request_duration_seconds_count", {"route": "chat"}) == 1
        assert sample("strata_cache_stores_total", {"layer": "l2", "result": "ok"}) == 1
        assert sample("strata_engine_prompt_tokens_total") == 6


# --- streams that must not be stored ------------------------------------------------------------


async def test_a_stream_cut_by_the_engine_ends_in_an_error_event_and_is_not_stored() -> None:
    engine = FakeEngine(model=MODEL, answer_bytes=400, break_stream_after=3)
    async with gateway(engine=engine, streaming=True) as gw:
        cut = await gw.chat(chat_body(stream=True))
        engine.break_stream_after = None
        retry = await gw.chat(chat_body(stream=True))
    chunks, done = chunks_of(cut)
    assert not done
    assert chunks[-1]["error"]["code"] == "bad_gateway"
    assert chunks[-1]["error"]["type"] == "server_error"
    assert chat_text(chunks[:-1]) != ""
    assert retry.headers["x-strata-cache"] == "miss"
    assert chunks_of(retry)[1]
    assert gw.engine_calls() == 2


def scripted_engine(*events: bytes) -> httpx.MockTransport:
    """An engine whose every stream is the given SSE events, in one piece."""

    async def body() -> AsyncIterator[bytes]:
        for event in events:
            yield b"data: " + event + b"\n\n"

    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body(), headers={"content-type": "text/event-stream"})

    return httpx.MockTransport(handle)


HEAD = b'"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"strata-fake"'


def chunk(choice: bytes) -> bytes:
    return b"{" + HEAD + b',"choices":[' + choice + b"]}"


ROLE = chunk(b'{"index":0,"delta":{"role":"assistant","content":"Hi"},"finish_reason":null}')
STOP = chunk(b'{"index":0,"delta":{},"finish_reason":"stop"}')


@pytest.mark.parametrize(
    "events",
    [
        pytest.param((ROLE, STOP), id="no-done"),
        pytest.param(
            (ROLE, b'{"error":{"message":"engine overloaded","code":500}}', b"[DONE]"),
            id="error-event",
        ),
        pytest.param((ROLE, b"[DONE]"), id="unfinished-choice"),
        pytest.param(
            (ROLE, chunk(b'{"index":0,"delta":{},"finish_reason":"abort"}'), b"[DONE]"),
            id="aborted",
        ),
        pytest.param((ROLE, b"{broken", STOP, b"[DONE]"), id="malformed-chunk"),
    ],
)
async def test_streams_that_did_not_end_normally_are_never_stored(events: tuple[bytes]) -> None:
    async with gateway(engine_transport=scripted_engine(*events)) as gw:
        first = await gw.chat(chat_body(stream=True))
        second = await gw.chat(chat_body(stream=True))
        stores = gw.registry.get_sample_value(
            "strata_cache_stores_total", {"layer": "l1", "result": "ok"}
        )
    assert first.headers["x-strata-cache"] == second.headers["x-strata-cache"] == "miss"
    assert "data: " in first.text  # relayed all the same
    assert stores == 0


async def test_a_connection_reset_after_done_is_not_an_error() -> None:
    async def body() -> AsyncIterator[bytes]:
        for event in (ROLE, STOP, b"[DONE]"):
            yield b"data: " + event + b"\n\n"
        raise httpx.ReadError("connection reset by peer")

    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body(), headers={"content-type": "text/event-stream"})

    async with gateway(engine_transport=httpx.MockTransport(handle)) as gw:
        first = await gw.chat(chat_body(stream=True))
        second = await gw.chat(chat_body(stream=True))
    chunks, done = chunks_of(first)
    assert done
    assert "error" not in first.text
    assert chat_text(chunks) == "Hi"
    assert second.headers["x-strata-cache"] == "hit"


async def test_a_stream_without_done_gets_an_error_event() -> None:
    async with gateway(engine_transport=scripted_engine(ROLE, STOP)) as gw:
        response = await gw.chat(chat_body(stream=True))
    chunks, done = chunks_of(response)
    assert not done
    assert chunks[-1]["error"]["code"] == "bad_gateway"


async def test_client_disconnect_cancels_the_engine_stream_and_stores_nothing() -> None:
    engine = FakeEngine(model=MODEL, answer_bytes=4000, chunk_delay=0.01)
    async with gateway(engine=engine, streaming=True) as gw:
        async with gw.client.stream("POST", CHAT, json=chat_body(stream=True)) as response:
            assert response.headers["x-strata-cache"] == "miss"
            received = []
            async for piece in response.aiter_raw():
                received.append(piece)
                if len(received) == 3:
                    break
        assert gw.engine_link is not None
        await gw.engine_link.idle()  # the engine noticed and stopped
        assert engine.cancelled == 1
        assert engine.completed_streams == 0
        engine.chunk_delay = 0
        again = await gw.chat(chat_body(stream=True))
    assert again.headers["x-strata-cache"] == "miss"
    assert chunks_of(again)[1]
    assert gw.engine_calls() == 2


async def test_a_client_gone_during_the_first_token_wait_cancels_the_engine() -> None:
    engine = FakeEngine(model=MODEL, first_token_delay=30)
    async with gateway(engine=engine, streaming=True) as gw:
        async with gw.client.stream("POST", CHAT, json=chat_body(stream=True)) as response:
            assert response.status_code == 200
        assert gw.engine_link is not None
        await asyncio.wait_for(gw.engine_link.idle(), 10)
    assert engine.cancelled == 1


@pytest.mark.parametrize("temperature", [0, 0.7], ids=["cached", "relayed"])
async def test_streams_from_an_engine_over_tcp(temperature: float) -> None:
    engine = FakeEngine(model=MODEL, answer_bytes=600, chunk_delay=0.001)
    body = chat_body(stream=True, temperature=temperature)
    async with gateway(engine=engine, engine_over_tcp=True) as gw:
        first = await gw.chat(body)
        second = await gw.chat(body)
        whole = await gw.chat(chat_body("something else"))
    live, done = chunks_of(first)
    assert done
    assert len(chat_text(live)) >= 500
    assert first.headers["x-strata-cache"] == "miss"
    assert second.headers["x-strata-cache"] == ("hit" if temperature == 0 else "miss")
    assert chunks_of(second)[1]
    assert whole.json()["choices"][0]["message"]["content"]
    assert engine.completed_streams == (1 if temperature == 0 else 2)


async def test_a_client_gone_cancels_an_engine_over_tcp() -> None:
    engine = FakeEngine(model=MODEL, answer_bytes=4000, chunk_delay=0.01)
    async with gateway(engine=engine, engine_over_tcp=True, streaming=True) as gw:
        async with gw.client.stream("POST", CHAT, json=chat_body(stream=True)) as response:
            received = []
            async for piece in response.aiter_raw():
                received.append(piece)
                if len(received) == 3:
                    break
        async with asyncio.timeout(10):
            while engine.cancelled == 0:
                await asyncio.sleep(0.01)
        engine.chunk_delay = 0
        again = await gw.chat(chat_body(stream=True))
    assert engine.completed_streams == 1
    assert again.headers["x-strata-cache"] == "miss"  # the abandoned stream was not stored
    assert chunks_of(again)[1]


async def test_a_streamed_miss_feeds_l3_and_an_l3_hit_streams() -> None:
    async with with_l3() as gw:
        streamed = await gw.chat(chat_body(QUESTION, stream=True), headers=auth())
        plain = await gw.chat(chat_body(PARAPHRASE), headers=auth())
        replayed = await gw.chat(
            chat_body("reset my password how do i", stream=True), headers=auth()
        )
    assert streamed.headers["x-strata-cache"] == "miss"
    assert (plain.headers["x-strata-cache"], plain.headers["x-strata-layer"]) == ("hit", "l3")
    text = chat_text(chunks_of(streamed)[0])
    assert plain.json()["choices"][0]["message"]["content"] == text
    assert (replayed.headers["x-strata-cache"], replayed.headers["x-strata-layer"]) == ("hit", "l3")
    assert chat_text(chunks_of(replayed)[0]) == text
    assert gw.engine_calls() == 1
