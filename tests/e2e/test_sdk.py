"""The official OpenAI SDK against running gateway and fake-engine processes and a real Redis."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.e2e.procs import Process, fake_engine, gateway_process, running
from tests.redisproc import RedisServer

pytestmark = pytest.mark.e2e

MODEL = "strata-fake"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def engine() -> Iterator[Process]:
    with fake_engine("--answer-bytes", "400") as proc:
        yield proc


@pytest.fixture
def prefix() -> str:
    return f"e2e-{uuid.uuid4().hex[:8]}"


def sdk(gw: Process) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def engine_calls(gw: Process) -> float:
    text = httpx.get(gw.url + "/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith('strata_engine_request_duration_seconds_count{route="chat"}'):
            return float(line.split()[-1])
    return 0.0


def ask(client: openai.OpenAI, messages=QUESTION, **params):  # type: ignore[no-untyped-def]
    params.setdefault("temperature", 0)
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, **params)
    return raw.headers, raw.parse()


def test_repeat_is_l1_hit_then_l2_hit_after_restart(
    engine: Process, redis_server: RedisServer, prefix: str
) -> None:
    redis_server.start()
    gw = gateway_process(engine.url, redis_server.url, prefix)
    with running(gw):
        client = sdk(gw)
        h1, first = ask(client)
        h2, second = ask(client)
        assert h1["x-strata-cache"] == "miss"
        assert (h2["x-strata-cache"], h2["x-strata-layer"]) == ("hit", "l1")
        assert second.choices[0].message.content == first.choices[0].message.content
        assert engine_calls(gw) == 1
    with running(gw):  # a new process: L1 is empty, Redis still has the answer
        h3, third = ask(sdk(gw))
        assert (h3["x-strata-cache"], h3["x-strata-layer"]) == ("hit", "l2")
        assert third.choices[0].message.content == first.choices[0].message.content
        assert engine_calls(gw) == 0


def test_sampled_requests_always_reach_the_engine(
    engine: Process, redis_server: RedisServer, prefix: str
) -> None:
    redis_server.start()
    with running(gateway_process(engine.url, redis_server.url, prefix)) as gw:
        client = sdk(gw)
        h1, a = ask(client, temperature=0.7)
        h2, b = ask(client, temperature=0.7)
        assert h1["x-strata-cache"] == h2["x-strata-cache"] == "miss"
        assert a.choices[0].message.content != b.choices[0].message.content
        assert engine_calls(gw) == 2


async def test_async_client_and_completions(
    engine: Process, redis_server: RedisServer, prefix: str
) -> None:
    redis_server.start()
    with running(gateway_process(engine.url, redis_server.url, prefix)) as gw:
        async with openai.AsyncOpenAI(
            base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=30
        ) as client:
            first = await client.chat.completions.with_raw_response.create(
                model=MODEL, messages=QUESTION, temperature=0, extra_body={"top_k": 3}
            )
            second = await client.chat.completions.with_raw_response.create(
                model=MODEL, messages=QUESTION, temperature=0, extra_body={"top_k": 3}
            )
            assert second.headers["x-strata-cache"] == "hit"
            assert second.parse().choices[0].message.content == (
                first.parse().choices[0].message.content
            )
            text = await client.completions.with_raw_response.create(
                model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=5
            )
            again = await client.completions.with_raw_response.create(
                model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=5
            )
            assert again.headers["x-strata-cache"] == "hit"
            assert again.parse().choices[0].text == text.parse().choices[0].text
            models = await client.models.list()
            assert [m.id for m in models.data] == [MODEL]


def test_sdk_sees_openai_errors(engine: Process, redis_server: RedisServer, prefix: str) -> None:
    redis_server.start()
    with running(gateway_process(engine.url, redis_server.url, prefix)) as gw:
        client = sdk(gw)
        with pytest.raises(openai.NotFoundError) as missing:
            client.chat.completions.create(model="no-such-model", messages=QUESTION, temperature=0)
        assert "no-such-model" in str(missing.value)
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=MODEL, messages=[], temperature=0)


def test_redis_outage_degrades_and_recovers_without_restart(
    engine: Process, redis_server: RedisServer, prefix: str
) -> None:
    redis_server.start()
    gw = gateway_process(engine.url, redis_server.url, prefix)
    other = gateway_process(engine.url, redis_server.url, prefix)
    with running(gw):
        client = sdk(gw)
        ask(client)  # stored in L1 and L2
        redis_server.stop()
        try:
            h_hit, _ = ask(client)
            assert (h_hit["x-strata-cache"], h_hit["x-strata-layer"]) == ("hit", "l1")
            during = [
                ask(client, messages=[{"role": "user", "content": f"q{i}"}]) for i in range(5)
            ]
            assert all(h["x-strata-cache"] == "miss" for h, _ in during)
            ready = httpx.get(gw.url + "/readyz", timeout=5)
            assert ready.status_code == 200
            assert ready.json()["checks"]["redis"] == "down"
        finally:
            redis_server.start()
        assert httpx.get(gw.url + "/readyz", timeout=5).json()["checks"]["redis"] == "up"
        # L2's breaker opened during the outage; its cooldown (1 s by default) passes, then the
        # next lookup is the trial that closes it.
        time.sleep(1.1)
        back = [{"role": "user", "content": "asked after Redis came back"}]
        ask(client, messages=back)  # stored in L2 again, by the same process
        with running(other):  # a second replica finds it in Redis
            h_other, _ = ask(sdk(other), messages=back)
            assert (h_other["x-strata-cache"], h_other["x-strata-layer"]) == ("hit", "l2")
