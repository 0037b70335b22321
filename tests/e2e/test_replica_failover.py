"""Several engine replicas behind `strata serve`, as processes.

Killing one replica under load: `strata serve --engine-url A --engine-url B` in front of two fake
engine processes, eight clients sending cache misses all along. After the ejection window no
request fails; the replica rejoins once restarted. The figures are printed as JSON. And
`strata serve --engines 2` launching two (stand-in) vLLM replicas and routing over both."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.procs import Process, _env
from tests.engine.test_launcher import stand_in_vllm  # noqa: F401 - a fixture
from tests.redisproc import free_port

pytestmark = pytest.mark.e2e

WINDOW = 1.0  # STRATA_ENGINE_EJECTION_WINDOW
PROBE = 0.2  # STRATA_ENGINE_PROBE_INTERVAL
WORKERS = 8
SYSTEMS = [
    f"You are the assistant of team {n}. " + "Answer in one short line. " * 6 for n in range(8)
]


def engine_process(port: int) -> Process:
    args = [sys.executable, "-m", "engine.fake", "--port", str(port), "--delay", "0.02"]
    return Process(f"engine-{port}", args, _env({}), port)


@pytest.fixture
def engines() -> Iterator[list[Process]]:
    procs = [engine_process(free_port()) for _ in range(2)]
    try:
        for proc in procs:
            proc.start("/health")
        yield procs
    finally:
        for proc in procs:
            proc.stop()


@pytest.fixture
def gateway(engines: list[Process]) -> Iterator[Process]:
    port = free_port()
    env = _env(
        {
            "STRATA_REDIS_ENABLED": "false",
            "STRATA_SEMANTIC": "off",
            "STRATA_ENGINE_EJECTION_WINDOW": str(WINDOW),
            "STRATA_ENGINE_PROBE_INTERVAL": str(PROBE),
        }
    )
    args = [sys.executable, "-m", "gateway", "serve", "--port", str(port)]
    for engine in engines:
        args += ["--engine-url", engine.url]
    proc = Process("gateway", args, env, port)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def healthy(gateway: Process, replica: str) -> float | None:
    text = httpx.get(gateway.url + "/metrics", timeout=5).text
    prefix = f'strata_engine_replica_healthy{{replica="{replica}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.removeprefix(prefix))
    return None


def completions(engine: Process) -> int:
    stats = httpx.get(engine.url + "/fake/stats", timeout=5).json()
    return int(stats["calls"].get("/v1/chat/completions", 0))


async def load(gateway: Process, stop: asyncio.Event, records: list[tuple[float, int]]) -> None:
    """Closed-loop clients sending distinct questions (cache misses): (sent at, status)."""
    counter = iter(range(10**9))

    async def worker(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            n = next(counter)
            body = {
                "model": "strata-fake",
                "temperature": 0,
                "messages": [
                    {"role": "system", "content": SYSTEMS[n % len(SYSTEMS)]},
                    {"role": "user", "content": f"Question number {n}?"},
                ],
            }
            sent = time.monotonic()
            try:
                answer = await client.post(gateway.url + "/v1/chat/completions", json=body)
                status = answer.status_code
            except httpx.HTTPError:
                status = 0
            records.append((sent, status))

    async with httpx.AsyncClient(timeout=10) as client:
        await asyncio.gather(*(worker(client) for _ in range(WORKERS)))


async def wait_until(check, timeout: float) -> float:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    while not await asyncio.to_thread(check):
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_killing_a_replica_under_load_fails_nothing_after_the_window(
    engines: list[Process], gateway: Process
) -> None:
    victim = engines[1]
    records: list[tuple[float, int]] = []
    stop = asyncio.Event()
    clients = asyncio.create_task(load(gateway, stop, records))
    try:
        await asyncio.sleep(1.0)
        served_before = await asyncio.to_thread(completions, victim)
        assert victim.proc is not None
        victim.proc.kill()  # SIGKILL: no goodbye
        killed = time.monotonic()
        await asyncio.to_thread(victim.proc.wait, 10)
        ejected_after = await wait_until(lambda: healthy(gateway, victim.url) == 0.0, 10)
        await asyncio.sleep(WINDOW + 1.0)
        await asyncio.to_thread(victim.start, "/health")
        restarted = time.monotonic()
        rejoined_after = await wait_until(lambda: healthy(gateway, victim.url) == 1.0, 10)
        await asyncio.sleep(1.0)
        served_after = await asyncio.to_thread(completions, victim)  # a new process: from 0
    finally:
        stop.set()
        await clients
    window_end = killed + WINDOW
    failed = [(sent, status) for sent, status in records if status != 200]
    figures = {
        "requests": len(records),
        "failed": len(failed),
        "failed_statuses": sorted({status for _, status in failed}),
        # Sent before the kill and still in flight on the victim when it died: the engine had
        # the request, so it is not replayed elsewhere (unless nothing at all reached it).
        "failed_in_flight_at_kill": sum(sent < killed for sent, _ in failed),
        "failed_within_window": sum(killed <= sent < window_end for sent, _ in failed),
        "failed_after_window": sum(sent >= window_end for sent, _ in failed),
        "requests_after_window": sum(sent >= window_end for sent, _ in records),
        "ejected_after_s": round(ejected_after, 3),
        "rejoined_after_restart_s": round(rejoined_after, 3),
        "restart_at_s_after_kill": round(restarted - killed, 3),
        "victim_requests_before_kill": served_before,
        "victim_requests_after_rejoin": served_after,
    }
    print(json.dumps(figures))
    assert served_before > 0  # it was taking its share before it died
    assert figures["failed_after_window"] == 0
    assert figures["requests_after_window"] > 0
    assert served_after > 0  # back in the rotation


def two_free_ports() -> int:
    while True:
        port = free_port()
        try:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port


@pytest.mark.usefixtures("stand_in_vllm")
def test_serve_engines_2_launches_two_replicas_and_routes_over_both(tmp_path: Path) -> None:
    first = two_free_ports()
    env = _env(
        {
            "STRATA_ENGINES": "2",
            "STRATA_ENGINE_PORT": str(first),
            "STRATA_ENGINE_PYTHON": sys.executable,  # the stand-in vLLM is on its path
            "STRATA_ENGINE_MODEL": "org/model",
            "STRATA_ENGINE_SERVED_MODEL_NAME": "strata-fake",
            "STRATA_ENGINE_DEVICE": "cpu",
            "STRATA_ENGINE_CPU_CORES": "0,1",
            "STRATA_DATA_DIR": str(tmp_path),
            "STRATA_REDIS_ENABLED": "false",
            "STRATA_SEMANTIC": "off",
        }
    )
    port = free_port()
    gateway = Process("gateway", [sys.executable, "-m", "gateway", "serve", "--port", str(port)],
                      env, port)  # fmt: skip
    engines = [f"http://127.0.0.1:{first + i}" for i in range(2)]
    gateway.start(timeout=60)
    try:
        for n, system in enumerate(SYSTEMS):
            body = {
                "model": "strata-fake",
                "temperature": 0,
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": f"Question {n}?"},
                ],
            }
            answer = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=30)
            assert answer.status_code == 200, answer.text
        served = [httpx.get(url + "/fake/stats", timeout=5).json()["calls"] for url in engines]
        assert all(calls.get("/v1/chat/completions", 0) > 0 for calls in served)
        assert [healthy(gateway, url) for url in engines] == [1.0, 1.0]
        logs = sorted(path.name for path in (tmp_path / "logs").iterdir())
        assert logs == [f"vllm-{first}.log", f"vllm-{first + 1}.log"]
    finally:
        gateway.stop()
    for url in engines:  # the gateway stopped its replicas
        with pytest.raises(httpx.HTTPError):
            httpx.get(url + "/health", timeout=2)
