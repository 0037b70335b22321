"""Engine-client benchmark: what one streamed engine call costs the gateway's process, per client.

Why: the gateway relays every stream from the engine; the client it does that with sets a floor
under its CPU per stream. This measures, in one run, side by side:
  - `httpx`: `httpx.AsyncClient` as the gateway configured it before (pool of 512, timeouts,
    `send(stream=True)` + `aiter_raw`);
  - `httpcore`: httpx's own layer removed — `httpcore.AsyncConnectionPool` sized to the
    concurrency, `stream()` + `aiter_stream` — the leanest configuration of that stack;
  - `http11`: `engine.http11.ConnectionPool`, the gateway's own client.
The fake engine (`python -m engine.fake`) streams 16 tokens per answer, the first after
`--first-token-ms`, then one every `--token-ms`; it runs pinned to `--engine-cpu`, this process
(uvloop, like the gateway) to `--client-cpu`. Each cell: N streams at concurrency c, every body read
to its end; rounds interleave the clients. Printed: this process's CPU time per stream (user +
system, `time.process_time`) — the number that matters, and one the machine's other tenants change
little — and the time to the first body chunk, p50/p99.

Run from the repository root:
    .venv/bin/python -m bench.engine_client
    .venv/bin/python -m bench.engine_client --rounds 3 --streams 400
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpcore
import httpx
import orjson
import uvloop

from bench.hit_path import HOST, BenchError, Processes, free_port, version, wait_http
from engine.http11 import ConnectionPool
from engine.transport import Timeouts

MODEL = "strata-fake"
PATH = "/v1/chat/completions"
CLIENTS = ("httpx", "httpcore", "http11")
HEADERS = {"content-type": "application/json", "accept": "application/json"}

# One streamed call: send `body`, read the stream to its end; returns seconds to the first chunk.
Call = Callable[[bytes], Awaitable[float]]


def body(number: int, tokens: int) -> bytes:
    return orjson.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"question {number}"}],
            "temperature": 0,
            "max_tokens": tokens,
            "stream": True,
        }
    )


class Clients:
    """Each client under test, open for the whole run so that connections stay warm."""

    def __init__(self, url: str, concurrency: int) -> None:
        self.url = url
        self.httpx = httpx.AsyncClient(
            base_url=url,
            headers=HEADERS,
            timeout=httpx.Timeout(connect=5, read=60, write=60, pool=5),
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=512),
            trust_env=False,
        )
        self.httpcore = httpcore.AsyncConnectionPool(max_connections=concurrency)
        self.http11 = ConnectionPool(url, timeouts=Timeouts(5, 60, 60, 5), headers=HEADERS)

    async def call_httpx(self, content: bytes) -> float:
        started = time.perf_counter()
        request = self.httpx.build_request("POST", PATH, content=content)
        response = await self.httpx.send(request, stream=True)
        first = 0.0
        try:
            async for _ in response.aiter_raw():
                first = first or time.perf_counter()
        finally:
            await response.aclose()
        return first - started

    async def call_httpcore(self, content: bytes) -> float:
        started = time.perf_counter()
        headers = [(k.encode(), v.encode()) for k, v in HEADERS.items()]
        first = 0.0
        async with self.httpcore.stream(
            "POST", self.url + PATH, headers=headers, content=content
        ) as response:
            async for _ in response.aiter_stream():
                first = first or time.perf_counter()
        return first - started

    async def call_http11(self, content: bytes) -> float:
        started = time.perf_counter()
        response = await self.http11.request("POST", PATH, content)
        first = 0.0
        try:
            async for _ in response:
                first = first or time.perf_counter()
        finally:
            await response.aclose()
        return first - started

    def call(self, name: str) -> Call:
        calls: dict[str, Call] = {
            "httpx": self.call_httpx,
            "httpcore": self.call_httpcore,
            "http11": self.call_http11,
        }
        return calls[name]

    async def aclose(self) -> None:
        await self.httpx.aclose()
        await self.httpcore.aclose()
        await self.http11.aclose()


async def cell(call: Call, bodies: list[bytes], concurrency: int) -> tuple[list[float], float]:
    """TTFBs (after one warm-up call per worker) and CPU seconds per stream."""
    feed = iter(bodies)
    ttfbs: list[float] = []

    async def worker() -> None:
        await call(next(feed))
        for content in feed:
            ttfbs.append(await call(content))

    before = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ttfbs, (time.process_time() - before) / len(bodies)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure(url: str, args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    numbers = itertools.count()
    for concurrency in (1, 32):
        clients = Clients(url, concurrency)
        streams = args.streams if concurrency == 32 else max(50, args.streams // 4)
        try:
            for round_no, name in itertools.product(range(args.rounds), CLIENTS):
                bodies = [body(next(numbers), args.tokens) for _ in range(streams + concurrency)]
                ttfbs, cpu = await cell(clients.call(name), bodies, concurrency)
                entry = results.setdefault(f"{name}/c{concurrency}", {"ttfb": [], "cpu": []})
                entry["ttfb"] += ttfbs
                entry["cpu"].append(cpu)
                print(
                    f"[bench] {name} c={concurrency} round {round_no + 1}: "
                    f"{cpu * 1000:.3f} CPU ms/stream",
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            await clients.aclose()
    return results


def render(results: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"- {os.cpu_count()} CPUs; Python {sys.version.split()[0]}, uvloop {version('uvloop')}, "
        f"httpx {version('httpx')}, httpcore {version('httpcore')}; client pinned to CPU "
        f"{args.client_cpu}, fake engine to CPU {args.engine_cpu}",
        f"- {args.tokens} tokens per stream, first after {args.first_token_ms:g} ms, then every "
        f"{args.token_ms:g} ms; {args.rounds} interleaved round(s); CPU: median of the rounds",
        "",
        "| client | conc | streams | client CPU ms / stream | vs httpx | TTFB p50 ms "
        "| TTFB p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for concurrency in (1, 32):
        base = statistics.median(results[f"httpx/c{concurrency}"]["cpu"])
        for name in CLIENTS:
            entry = results[f"{name}/c{concurrency}"]
            cpu = statistics.median(entry["cpu"])
            lines.append(
                f"| {name} | {concurrency} | {len(entry['ttfb'])} | {cpu * 1000:.3f} | "
                f"{cpu / base:.2f} | {statistics.median(entry['ttfb']) * 1000:.3f} | "
                f"{percentile(entry['ttfb'], 0.99) * 1000:.3f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--first-token-ms", type=float, default=20.0)
    parser.add_argument("--token-ms", type=float, default=5.0)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--streams", type=int, default=640, help="streams per cell at c=32")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--client-cpu", type=int, default=0)
    parser.add_argument("--engine-cpu", type=int, default=1)
    args = parser.parse_args(argv)
    pin = shutil.which("taskset") is not None and len(os.sched_getaffinity(0)) > 1
    workdir = Path(tempfile.mkdtemp(prefix="strata-bench-client-"))
    procs = Processes(workdir)
    try:
        port = free_port()
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": root}
        engine = procs.start(
            "engine",
            [sys.executable, "-m", "engine.fake", "--host", HOST, "--port", str(port),
             "--model", MODEL, "--answer-bytes", "2000",
             "--first-token-delay", str(args.first_token_ms / 1000),
             "--chunk-delay", str(args.token_ms / 1000)],
            env=env, cpu=args.engine_cpu if pin else None,
        )  # fmt: skip
        wait_http(engine, port, "/health")
        if pin:
            os.sched_setaffinity(0, {args.client_cpu})
        results = uvloop.run(measure(f"http://{HOST}:{port}", args))
    except BenchError as exc:
        print(f"[bench] ERROR: {exc}\n[bench] process logs kept in {workdir}", file=sys.stderr)
        return 1
    finally:
        procs.stop_all()
    shutil.rmtree(workdir, ignore_errors=True)
    print(render(results, args))
    summary = {
        key: {"cpu_ms": [c * 1000 for c in entry["cpu"]], "n": len(entry["ttfb"])}
        for key, entry in results.items()
    }
    print(json.dumps(summary, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
