"""Concurrent identical misses: one engine call, every client the same answer (JSON or stream);
errors reach every waiter and are not cached; a leader's client leaving does not cost the others
their answer; a bounded wait; tenants never share a flight."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from engine.fake import FakeEngine
from tests.gateway.harness import CHAT, MODEL, chat_body, gateway
from tests.gateway.test_streaming import chat_text, chunks_of


async def burst(gw: Any, bodies: list[dict[str, Any]], **kw: Any) -> list[httpx.Response]:
    return list(await asyncio.gather(*(gw.chat(b, **kw) for b in bodies)))


def answer_text(response: httpx.Response) -> str:
    if response.headers["content-type"].startswith("text/event-stream"):
        chunks, done = chunks_of(response)
        assert done
        return chat_text(chunks)
    content: str = response.json()["choices"][0]["message"]["content"]
    return content


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_100_identical_misses_make_one_engine_call(stream: bool) -> None:
    engine = FakeEngine(model=MODEL, delay=0.2, answer_bytes=400)
    async with gateway(engine=engine) as gw:
        replies = await burst(gw, [chat_body(stream=stream)] * 100)
        assert gw.engine_calls() == 1
        counts = gw.registry.get_sample_value
        coalesced = {"route": "chat", "status": "200", "outcome": "coalesced"}
        assert counts("strata_requests_total", coalesced) == 99
    assert all(r.status_code == 200 for r in replies)
    kinds = sorted(r.headers["x-strata-cache"] for r in replies)
    assert kinds == ["coalesced"] * 99 + ["miss"]
    texts = {answer_text(r) for r in replies}
    assert len(texts) == 1
    assert len(texts.pop()) >= 300
    if not stream:
        assert len({r.content for r in replies}) == 1  # byte for byte the engine's answer


async def test_streamed_and_plain_waiters_share_one_call() -> None:
    engine = FakeEngine(model=MODEL, delay=0.2, answer_bytes=400)
    async with gateway(engine=engine) as gw:
        bodies = [chat_body(stream=i % 2 == 0) for i in range(20)]
        replies = await burst(gw, bodies)
        assert gw.engine_calls() == 1
    assert len({answer_text(r) for r in replies}) == 1


async def test_an_engine_error_reaches_every_waiter_and_is_not_cached() -> None:
    engine = FakeEngine(model=MODEL, delay=0.2)
    error = {"object": "error", "message": "boom", "type": "InternalServerError", "code": 500}
    engine.fail_next = [(500, error)]
    async with gateway(engine=engine) as gw:
        replies = await burst(gw, [chat_body()] * 10)
        assert gw.engine_calls() == 1
        assert {r.status_code for r in replies} == {500}
        assert all(r.json()["error"]["message"] for r in replies)
        again = await gw.chat()
    assert again.status_code == 200
    assert again.headers["x-strata-cache"] == "miss"
    assert gw.engine_calls() == 2


async def test_different_tenants_never_share_a_flight() -> None:
    engine = FakeEngine(model=MODEL, delay=0.2)
    keys = {"tenant-a": "key-a-0123456789", "tenant-b": "key-b-0123456789"}
    async with gateway(engine=engine, api_keys=keys) as gw:
        a = gw.chat(chat_body(), headers={"authorization": "Bearer key-a-0123456789"})
        b = gw.chat(chat_body(), headers={"authorization": "Bearer key-b-0123456789"})
        replies = await asyncio.gather(a, b)
        assert gw.engine_calls() == 2
    assert [r.headers["x-strata-cache"] for r in replies] == ["miss", "miss"]


async def test_different_requests_are_not_coalesced() -> None:
    engine = FakeEngine(model=MODEL, delay=0.1)
    async with gateway(engine=engine) as gw:
        await burst(gw, [chat_body(f"question {i}") for i in range(5)])
        assert gw.engine_calls() == 5


async def test_waiters_past_the_wait_ask_the_engine_themselves_and_store_nothing() -> None:
    engine = FakeEngine(model=MODEL, delay=0.5)
    async with gateway(engine=engine, coalesce_wait=0.05) as gw:
        replies = await burst(gw, [chat_body()] * 3)
        assert gw.engine_calls() == 3
        stores = gw.chain.counters["l1"].stores
    assert sorted(r.headers["x-strata-cache"] for r in replies) == ["miss"] * 3
    assert stores == 1  # only the leader wrote


async def test_coalescing_off() -> None:
    engine = FakeEngine(model=MODEL, delay=0.1)
    async with gateway(engine=engine, coalesce_wait=0) as gw:
        await burst(gw, [chat_body()] * 4)
        assert gw.engine_calls() == 4


async def test_a_stream_leader_whose_client_leaves_still_answers_the_waiters() -> None:
    engine = FakeEngine(model=MODEL, answer_bytes=2000, chunk_delay=0.01)
    # Over TCP, as in production: the gateway's own client reads on after the leader's cancel.
    async with gateway(engine=engine, streaming=True, engine_over_tcp=True) as gw:
        async with gw.client.stream("POST", CHAT, json=chat_body(stream=True)) as response:
            assert response.headers["x-strata-cache"] == "miss"
            waiters = [asyncio.create_task(gw.chat(chat_body(stream=s))) for s in (True, False)]
            received = 0
            async for _piece in response.aiter_raw():
                received += 1
                if received == 3:
                    break  # the leader's client leaves, the waiters stay
        replies = await asyncio.wait_for(asyncio.gather(*waiters), 30)
        assert [r.headers["x-strata-cache"] for r in replies] == ["coalesced", "coalesced"]
        assert len({answer_text(r) for r in replies}) == 1
        assert engine.cancelled == 0
        assert engine.completed_streams == 1
        assert gw.engine_calls() == 1
        hit = await gw.chat(chat_body())
    assert hit.headers["x-strata-cache"] == "hit"  # read to the end in the background, stored
    assert answer_text(hit) == answer_text(replies[0])


async def test_a_leader_alone_leaving_still_cancels_the_engine() -> None:
    engine = FakeEngine(model=MODEL, answer_bytes=4000, chunk_delay=0.01)
    async with gateway(engine=engine, streaming=True) as gw:
        async with gw.client.stream("POST", CHAT, json=chat_body(stream=True)) as response:
            received = 0
            async for _piece in response.aiter_raw():
                received += 1
                if received == 3:
                    break
        assert gw.engine_link is not None
        await gw.engine_link.idle()
        assert engine.cancelled == 1
        engine.chunk_delay = 0
        again = await gw.chat(chat_body(stream=True))
    assert again.headers["x-strata-cache"] == "miss"  # a new leader, nothing was stored


async def test_a_json_leader_cancelled_does_not_cancel_the_engine_call() -> None:
    engine = FakeEngine(model=MODEL, delay=0.3)
    async with gateway(engine=engine) as gw:
        leader = asyncio.create_task(gw.chat())
        await asyncio.sleep(0.05)
        waiter = asyncio.create_task(gw.chat())
        await asyncio.sleep(0.05)
        leader.cancel()
        reply = await asyncio.wait_for(waiter, 10)
        assert reply.headers["x-strata-cache"] == "coalesced"
        assert gw.engine_calls() == 1
        hit = await gw.chat()
    assert hit.headers["x-strata-cache"] == "hit"
