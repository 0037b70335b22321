"""The replica pool over fake engines on real loopback ports: placement by policy, bounded load,
ejection of a dead replica, probes that bring it back, no replay of a request already sent."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from engine import EngineClient, EnginePool, EngineTimeout, EngineUnavailable
from engine.fake import FakeEngine
from engine.routing import Policy, affinity_key
from tests.asgi_server import served
from tests.polling import eventually

CHAT = "/v1/chat/completions"
MODEL = "strata-fake"


def body(system: str, question: str) -> dict[str, Any]:
    return {
        "model": MODEL,
        "temperature": 0,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
    }


def system_prompt(n: int) -> str:
    return f"System prompt number {n}. " + "Answer briefly and accurately. " * 8


def key_of(request: dict[str, Any]) -> int | None:
    return affinity_key("chat", request, block_chars=64, max_blocks=16)


class FakeReplica:
    """A fake engine served on a fixed loopback port, which a test can stop and start again."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.port = 0
        self.url = ""
        self._stack: contextlib.AsyncExitStack | None = None

    async def start(self) -> None:
        self._stack = contextlib.AsyncExitStack()
        self.url = await self._stack.enter_async_context(served(self.engine, self.port))
        self.port = int(self.url.rsplit(":", 1)[1])

    async def stop(self) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            await stack.aclose()

    def completions(self) -> int:
        return self.engine.calls[CHAT]


@contextlib.asynccontextmanager
async def replicas(*engines: FakeEngine) -> AsyncIterator[list[FakeReplica]]:
    running = [FakeReplica(engine) for engine in engines]
    try:
        for replica in running:
            await replica.start()
        yield running
    finally:
        for replica in running:
            await replica.stop()


@contextlib.asynccontextmanager
async def pool_of(
    running: list[FakeReplica], *, probes: bool = False, read_timeout: float = 5.0, **kw: Any
) -> AsyncIterator[EnginePool]:
    kw.setdefault("ejection_window", 60.0)
    kw.setdefault("probe_interval", 0.05)
    pool = EnginePool(
        [EngineClient(r.url, retries=0, read_timeout=read_timeout) for r in running], **kw
    )
    if probes:
        await pool.start()
    try:
        yield pool
    finally:
        await pool.aclose()


@contextlib.asynccontextmanager
async def fleet(
    *engines: FakeEngine, **kw: Any
) -> AsyncIterator[tuple[list[FakeReplica], EnginePool]]:
    async with replicas(*engines) as running, pool_of(running, **kw) as pool:
        yield running, pool


async def ask(pool: EnginePool, request: dict[str, Any], *, route: bool = True) -> int:
    affinity = key_of(request) if route else None
    answer = await pool.post(CHAT, orjson.dumps(request), affinity=affinity)
    return answer.status


async def test_requests_sharing_a_system_prompt_land_on_one_replica() -> None:
    async with fleet(FakeEngine(), FakeEngine()) as (running, pool):
        placed: dict[int, set[int]] = {}
        for n in range(12):
            for question in ("Where is my order?", "Can I pay by card?", "Do you ship abroad?"):
                before = [r.completions() for r in running]
                assert await ask(pool, body(system_prompt(n), question)) == 200
                after = [r.completions() for r in running]
                placed.setdefault(n, set()).update(
                    i for i, (b, a) in enumerate(zip(before, after, strict=True)) if a > b
                )
        assert all(len(where) == 1 for where in placed.values())  # one replica per prompt
        assert {i for where in placed.values() for i in where} == {0, 1}  # both are used
        # Each prompt placed once (its ring replica, or the next when that one held its share
        # of the prompts), and found there again.
        assert set(pool.decisions) <= {"affinity", "overflow"}
        assert sum(pool.decisions.values()) == 36
        assert pool.decisions["overflow"] <= 12
        assert max(pool.prefixes.counts) <= math.ceil(1.25 * 12 / 2)
        assert [r.in_flight for r in pool.replicas] == [0, 0]


@pytest.mark.parametrize(
    ("policy", "reason"), [("round_robin", "round_robin"), ("least_loaded", "least_loaded")]
)
async def test_round_robin_and_least_loaded_spread_one_prompt(policy: Policy, reason: str) -> None:
    async with fleet(FakeEngine(), FakeEngine(), policy=policy) as (running, pool):
        for question in range(6):
            assert await ask(pool, body(system_prompt(1), f"question {question}")) == 200
        assert [r.completions() for r in running] == [3, 3]
        assert pool.decisions == {reason: 6}
        assert not pool.prefix_routing


async def test_a_request_without_affinity_goes_to_the_least_loaded_replica() -> None:
    slow = FakeEngine(chunk_delay=0.05, answer_bytes=400)
    async with fleet(slow, FakeEngine()) as (running, pool):
        stream = await pool.open_stream(CHAT, orjson.dumps({**body("s", "q"), "stream": True}))
        busy = next(i for i, r in enumerate(pool.replicas) if r.in_flight == 1)
        assert await ask(pool, body("s", "bare question"), route=False) == 200
        idle = 1 - busy
        assert running[idle].completions() == 1
        assert pool.decisions["least_loaded"] == 2
        await stream.aclose()
        await stream.aclose()  # closing twice gives the slot back once
        assert [r.in_flight for r in pool.replicas] == [0, 0]


async def test_one_hot_prefix_over_100_concurrent_requests_stays_within_the_bound() -> None:
    engines = [FakeEngine(delay=0.3), FakeEngine(delay=0.3)]
    async with fleet(*engines, load_factor=1.25) as (running, pool):
        hot = body(system_prompt(7), "the same question")
        peaks = [0, 0]

        async def sample() -> None:
            while True:
                for i, replica in enumerate(pool.replicas):
                    peaks[i] = max(peaks[i], replica.in_flight)
                await asyncio.sleep(0.005)

        sampler = asyncio.create_task(sample())
        try:
            statuses = await asyncio.gather(*(ask(pool, hot) for _ in range(100)))
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
    assert statuses == [200] * 100
    bound = math.ceil(1.25 * 100 / 2)
    calls = [r.completions() for r in running]
    assert max(calls) <= bound
    assert max(peaks) <= bound
    assert sum(calls) == 100
    assert pool.decisions["affinity"] + pool.decisions["overflow"] == 100
    assert pool.decisions["overflow"] > 0  # the hot prefix spilled over instead of piling up
    print({"calls": calls, "peak_in_flight": peaks, "bound": bound, **pool.decisions})


async def test_a_dead_replica_is_ejected_and_costs_clients_nothing() -> None:
    async with fleet(FakeEngine(), FakeEngine(), policy="round_robin") as (running, pool):
        await running[0].stop()
        statuses = [await ask(pool, body(system_prompt(n), "q")) for n in range(10)]
        assert statuses == [200] * 10
        assert running[1].completions() == 10
        dead = pool.replicas[0]
        assert (dead.healthy, dead.ejections, dead.failed) == (False, 1, 1)
        assert pool.decisions["retry"] == 1  # only the request that found it dead


async def test_probes_bring_an_ejected_replica_back_after_its_window() -> None:
    async with fleet(
        FakeEngine(), FakeEngine(), policy="round_robin", probes=True, ejection_window=0.3
    ) as (running, pool):
        await running[0].stop()
        assert await ask(pool, body("s", "q0")) == 200
        assert not pool.replicas[0].healthy
        await running[0].start()  # the same port again
        await eventually(lambda: pool.replicas[0].healthy, timeout=5)
        for n in range(4):
            assert await ask(pool, body("s", f"q{n + 1}")) == 200
        assert running[0].completions() == 2  # back in the rotation


async def test_probes_eject_a_replica_that_no_request_found_dead() -> None:
    async with fleet(FakeEngine(), FakeEngine(), probes=True) as (running, pool):
        await running[1].stop()
        await eventually(lambda: not pool.replicas[1].healthy, timeout=5)
        assert pool.replicas[1].ejections == 1
        assert pool.replicas[1].failed == 0
        assert pool.replicas[0].healthy


async def test_a_request_already_sent_is_never_replayed_elsewhere() -> None:
    # Slower than the read timeout, but done before its server's graceful shutdown ends.
    async with fleet(
        FakeEngine(delay=0.5), FakeEngine(), policy="round_robin", read_timeout=0.1
    ) as (running, pool):
        with pytest.raises(EngineTimeout) as info:
            await ask(pool, body("s", "q"))
        assert info.value.status == 504
        assert running[1].completions() == 0  # not sent to the other replica
        assert not pool.replicas[0].healthy  # a replica that times out is ejected
        assert pool.replicas[0].in_flight == 0


async def test_an_engine_error_answer_is_passed_on_not_retried() -> None:
    engine = FakeEngine()
    engine.fail_next.append((500, {"error": {"message": "boom", "type": "server_error"}}))
    async with fleet(engine, FakeEngine(), policy="round_robin") as (running, pool):
        assert await ask(pool, body("s", "q")) == 500
        assert running[1].completions() == 0
        assert pool.replicas[0].healthy
        assert pool.replicas[0].answered == 1


async def test_every_replica_down_is_engine_unavailable_then_panic_finds_one_back() -> None:
    async with fleet(FakeEngine(), FakeEngine()) as (running, pool):
        for replica in running:
            await replica.stop()
        with pytest.raises(EngineUnavailable) as info:
            await ask(pool, body("s", "q"))
        assert (info.value.status, info.value.code) == (503, "engine_unavailable")
        assert not any(r.healthy for r in pool.replicas)
        await running[1].start()
        # Every replica is ejected: each is tried anyway, and the one that answers is back.
        assert await ask(pool, body("s", "q")) == 200
        assert pool.decisions["panic"] >= 1
        assert pool.replicas[1].healthy
        assert not pool.replicas[0].healthy


async def test_the_gateways_own_questions_fail_over_to_a_healthy_replica() -> None:
    async with fleet(FakeEngine(), FakeEngine()) as (running, pool):
        await running[0].stop()
        models = await pool.models()
        assert models.status == 200
        assert running[1].engine.calls["/v1/models"] == 1
        assert await pool.healthy()
        await running[1].stop()
        assert not await pool.healthy()


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"urls": ["http://127.0.0.1:1"]}, "at least two"),
        ({"urls": ["http://127.0.0.1:1", "http://127.0.0.1:1/"]}, "its own URL"),
        ({"load_factor": 0.5}, "load_factor"),
        ({"load_slack": -1}, "load_slack"),
        ({"ejection_window": 0}, "ejection_window"),
    ],
)
async def test_a_bad_pool_is_refused(kw: dict[str, Any], message: str) -> None:
    urls = kw.pop("urls", ["http://127.0.0.1:1", "http://127.0.0.1:2"])
    clients = [EngineClient(url) for url in urls]
    try:
        with pytest.raises(ValueError, match=message):
            EnginePool(clients, **kw)
    finally:
        for client in clients:
            await client.aclose()
