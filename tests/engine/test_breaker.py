"""The circuit breaker's state machine, and the engine client behind it: a dead engine turns into
immediate `EngineUnavailable`, connection failures are retried (and nothing else), and a trial call
closes the breaker again once the engine is back."""

from __future__ import annotations

import asyncio
import time

import pytest

from engine import EngineClient, EngineTimeout, EngineUnavailable
from engine.breaker import Breaker
from tests.engine.test_http11 import answer, raw_server, read_request
from tests.redisproc import free_port


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_threshold_failures_in_a_row() -> None:
    clock = Clock()
    breaker = Breaker(threshold=3, cooldown=1.0, clock=clock)
    breaker.failure()
    breaker.failure()
    breaker.success()  # the count starts again
    breaker.failure()
    breaker.failure()
    assert breaker.allow()
    breaker.failure()
    assert breaker.state == "open"
    assert not breaker.allow()
    assert breaker.retry_in() == pytest.approx(1.0)
    assert breaker.opened == 1


def test_half_open_lets_one_trial_through_and_its_answer_decides() -> None:
    clock = Clock()
    breaker = Breaker(threshold=1, cooldown=1.0, clock=clock)
    breaker.failure()
    clock.now += 1.0
    assert breaker.allow()  # the trial
    assert breaker.state == "half_open"
    assert not breaker.allow()  # one at a time
    breaker.failure()
    assert breaker.state == "open"
    assert breaker.opened == 2
    assert not breaker.allow()
    clock.now += 1.0
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed"
    assert all(breaker.allow() for _ in range(5))


def test_a_trial_that_never_reports_back_is_replaced_after_a_cooldown() -> None:
    clock = Clock()
    breaker = Breaker(threshold=1, cooldown=1.0, clock=clock)
    breaker.failure()
    clock.now += 1.0
    assert breaker.allow()
    clock.now += 0.5
    assert not breaker.allow()
    clock.now += 0.5
    assert breaker.allow()


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="threshold"):
        Breaker(threshold=0)


async def test_a_refused_connection_is_retried_then_fails() -> None:
    breaker = Breaker(threshold=10, cooldown=5.0)
    client = EngineClient(
        f"http://127.0.0.1:{free_port()}", breaker=breaker, retries=2, retry_backoff=0.01
    )
    try:
        with pytest.raises(EngineUnavailable):
            await client.post("/v1/chat/completions", b"{}")
    finally:
        await client.aclose()
    assert breaker._failures == 3  # the call and its two retries


async def test_a_dead_engine_fails_fast_once_the_breaker_is_open() -> None:
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(60)

    async with raw_server(never_answer) as server:
        breaker = Breaker(threshold=2, cooldown=30.0)
        client = EngineClient(server.url, read_timeout=0.2, breaker=breaker)
        try:
            for _ in range(2):
                with pytest.raises(EngineTimeout):  # not retried: the engine had the request
                    await client.post("/v1/chat/completions", b"{}")
            assert server.connections == 2
            started = time.perf_counter()
            with pytest.raises(EngineUnavailable, match="failing"):
                await client.open_stream("/v1/chat/completions", b"{}")
            assert time.perf_counter() - started < 0.1
            assert server.connections == 2  # not even a connection
        finally:
            await client.aclose()


async def test_the_breaker_closes_when_the_engine_answers_again() -> None:
    healthy = False

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            if not healthy:
                writer.close()  # a broken engine: closes without answering
                return
            writer.write(answer(b"{}"))

    async with raw_server(handle) as server:
        breaker = Breaker(threshold=2, cooldown=0.05)
        client = EngineClient(server.url, breaker=breaker)
        try:
            for _ in range(2):
                with pytest.raises(Exception):  # noqa: B017, PT011 - protocol error either way
                    await client.post("/v1/chat/completions", b"{}")
            assert breaker.state == "open"
            healthy = True
            await asyncio.sleep(0.06)
            reply = await client.post("/v1/chat/completions", b"{}")
            assert reply.status == 200
            assert breaker.state == "closed"
        finally:
            await client.aclose()
