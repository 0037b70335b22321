"""Streaming benchmark: time to first byte through Strata vs straight from the engine, and how fast
a cached 1,000-token answer is replayed as a stream.

Processes (each in its own process group, all killed at the end, even on errors or Ctrl-C):
  - the fake engine (`python -m engine.fake`) with a fixed first-token delay: it sends its headers
    at once, the first event after `--first-token-ms`, then one word every `--token-ms`;
  - a private `redis-server`, so that a miss pays its real L2 lookup and store;
  - the gateway as a real `strata serve` process (uvloop + httptools, `gc.freeze()`).
With 2+ CPUs the gateway is pinned to `--server-cpu` and everything else (engine, Redis, this
client) to `--client-cpu`, so that the gateway's own cost shows and the rest does not move.

TTFB: the client is a small HTTP/1.1 client on raw asyncio streams (one keep-alive connection per
concurrent worker, chunked decoding by hand), so its own cost is tiny and the same on both paths.
TTFB is the time from writing the request to reading the first chunk of the body — the first SSE
event, the moment a user sees the answer start. Rows:
  - `direct`: the engine itself;
  - `miss`: through the gateway, a cacheable stream (temperature 0, a new question every time):
    L1 and L2 lookups, the relay with reassembly, and the store before `[DONE]`;
  - `relay`: through the gateway, a sampled stream (temperature 0.7): no cache work at all.
Each row at concurrency 1 and 32; rounds interleave the rows so that machine noise hits them alike;
samples from every round are pooled. Every response is checked (200, the expected
`X-Strata-Cache`, ends with `data: [DONE]`) and a bad one fails the run. Next to the latencies:
the gateway's CPU time per stream (its process group's user + system time over the cell), a cost
that other tenants of a shared machine do not change much.

Replay: one 1,000-token answer is streamed once (stored), then replayed as a hit again and again;
printed are replays/s, SSE events/s, tokens/s and MB/s seen by the client (whole responses), and
the rate of the pure `gateway.replay.replay` function in this process for comparison.

Run from the repository root:
    .venv/bin/python -m bench.stream_ttfb
    .venv/bin/python -m bench.stream_ttfb --rounds 3 --requests-c1 300 --requests-c32 3200
Output: a markdown table, the verdicts against the issue's targets (TTFB overhead p50 <= 1 ms and
p99 <= 5 ms), and a final line of JSON with every number.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from bench.hit_path import (
    HOST,
    BenchError,
    Processes,
    cpu_model,
    free_port,
    group_cpu_seconds,
    version,
    wait_http,
)
from gateway.replay import replay

MODEL = "strata-fake"
PATH = "/v1/chat/completions"
ROWS = ("direct", "miss", "relay")
CONCURRENCIES = (1, 32)
OVERHEAD_P50_MAX_MS = 1.0
OVERHEAD_P99_MAX_MS = 5.0
REPLAY_TOKENS = 1000


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- a tiny HTTP client


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    ttfb: float  # seconds to the first body chunk
    total: float  # seconds to the end of the body
    body: bytes


class Connection:
    """One keep-alive HTTP/1.1 connection; requests go one after another."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, timeout: float = 30.0) -> Reply:
        async with asyncio.timeout(timeout):
            return await self._post(path, body)

    async def _post(self, path: str, body: bytes) -> Reply:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
        assert self.reader is not None
        request = (
            f"POST {path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        started = time.perf_counter()
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        parts: list[bytes] = []
        first = 0.0
        if headers.get("transfer-encoding") == "chunked":
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    break
                parts.append((await self.reader.readexactly(size + 2))[:-2])
                if not first:
                    first = time.perf_counter()
        else:
            parts.append(await self.reader.readexactly(int(headers.get("content-length", "0"))))
            first = time.perf_counter()
        ended = time.perf_counter()
        if headers.get("connection") == "close":
            await self.close()
        return Reply(status, headers, first - started, ended - started, b"".join(parts))

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def check(reply: Reply, label: str, cache: str | None) -> None:
    problems = []
    if reply.status != 200:
        problems.append(f"status {reply.status}")
    if cache is not None and reply.headers.get("x-strata-cache") != cache:
        problems.append(f"X-Strata-Cache {reply.headers.get('x-strata-cache')!r} != {cache!r}")
    if not reply.body.endswith(b"data: [DONE]\n\n"):
        problems.append("the stream did not end with data: [DONE]")
    if problems:
        raise BenchError(f"{label}: {', '.join(problems)}; body {reply.body[-300:]!r}")


async def load(
    port: int, bodies: list[bytes], concurrency: int, label: str, cache: str | None
) -> list[float]:
    """Send every body, `concurrency` at a time on keep-alive connections; TTFBs in seconds."""
    feed = iter(bodies)
    ttfbs: list[float] = []

    async def worker() -> None:
        connection = Connection(port)
        try:
            warm = await connection.post(PATH, next(feed))  # opens the connection; not recorded
            check(warm, label, cache)
            for body in feed:
                reply = await connection.post(PATH, body)
                check(reply, label, cache)
                ttfbs.append(reply.ttfb)
        finally:
            await connection.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ttfbs


def request(content: str, *, temperature: float, max_tokens: int) -> bytes:
    return orjson.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": content}],
            "temperature": temperature,
            "max_tokens": max_tokens,
            "stream": True,
        }
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


# --------------------------------------------------------------------------- the run


@dataclass
class Config:
    first_token_ms: float
    token_ms: float
    tokens: int
    rounds: int
    requests: dict[int, int]
    replays: int
    server_cpu: int | None
    client_cpu: int | None


class Bench:
    def __init__(self, config: Config, procs: Processes) -> None:
        self.config = config
        self.procs = procs
        self.python = sys.executable
        self.engine_port = 0
        self.gateway_port = 0
        self.gateway_group = 0
        self.redis = "off"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        env.update(extra)
        return env

    def start(self) -> None:
        client_cpu = self.config.client_cpu
        self.engine_port = free_port()
        engine = self.procs.start(
            "engine",
            [self.python, "-m", "engine.fake", "--host", HOST, "--port", str(self.engine_port),
             "--model", MODEL, "--answer-bytes", "8000",
             "--first-token-delay", str(self.config.first_token_ms / 1000),
             "--chunk-delay", str(self.config.token_ms / 1000)],
            env=self.env(), cpu=client_cpu,
        )  # fmt: skip
        wait_http(engine, self.engine_port, "/health")
        settings = {"STRATA_LOG_LEVEL": "warning", "STRATA_SEMANTIC": "off"}
        server = shutil.which("redis-server")
        if server is not None:
            redis_port = free_port()
            self.procs.start(
                "redis",
                [server, "--port", str(redis_port), "--bind", HOST, "--save", "",
                 "--appendonly", "no"],
                cpu=client_cpu,
            )  # fmt: skip
            self.redis = f"redis://{HOST}:{redis_port}/0"
            settings["STRATA_REDIS_URL"] = self.redis
            settings["STRATA_REDIS_KEY_PREFIX"] = f"bench-stream-{os.getpid()}"
        else:
            log("no redis-server binary: the gateway runs without L2")
            settings["STRATA_REDIS_ENABLED"] = "false"
        self.gateway_port = free_port()
        gateway = self.procs.start(
            "gateway",
            [self.python, "-m", "gateway", "serve", "--engine-url",
             f"http://{HOST}:{self.engine_port}", "--host", HOST, "--port", str(self.gateway_port)],
            env=self.env(**settings), cpu=self.config.server_cpu,
        )  # fmt: skip
        self.gateway_group = gateway.popen.pid  # its own session: the group id is its pid
        wait_http(gateway, self.gateway_port, "/healthz", timeout=120)
        wait_http(gateway, self.gateway_port, "/readyz", timeout=30)

    def bodies(self, row: str, count: int) -> list[bytes]:
        temperature = 0.7 if row == "relay" else 0.0
        tag = uuid.uuid4().hex
        return [
            request(f"question {tag} {i}", temperature=temperature, max_tokens=self.config.tokens)
            for i in range(count)
        ]

    async def ttfb(self) -> tuple[dict[str, dict[int, list[float]]], dict[str, float]]:
        """TTFB samples per row and concurrency, and the gateway's CPU ms per stream per cell."""
        samples: dict[str, dict[int, list[float]]] = {
            r: {c: [] for c in CONCURRENCIES} for r in ROWS
        }
        cpu: dict[str, float] = {}
        for round_no, concurrency, row in itertools.product(
            range(1, self.config.rounds + 1), CONCURRENCIES, ROWS
        ):
            count = self.config.requests[concurrency] + concurrency  # + one warm-up per worker
            port = self.engine_port if row == "direct" else self.gateway_port
            cache = {"direct": None, "miss": "miss", "relay": "miss"}[row]
            label = f"{row} c={concurrency} round {round_no}"
            before = group_cpu_seconds(self.gateway_group)
            got = await load(port, self.bodies(row, count), concurrency, label, cache)
            used = group_cpu_seconds(self.gateway_group) - before
            samples[row][concurrency].extend(got)
            cell = f"{row}/c{concurrency}"
            cpu[cell] = cpu.get(cell, 0.0) + used * 1000 / count / self.config.rounds
            log(f"{label}: {len(got)} requests, TTFB p50 {statistics.median(got) * 1000:.2f} ms")
        return samples, cpu

    async def replay_rate(self) -> dict[str, Any]:
        body = request(f"long answer {uuid.uuid4().hex}", temperature=0, max_tokens=REPLAY_TOKENS)
        connection = Connection(self.gateway_port)
        try:
            first = await connection.post(PATH, body, timeout=120)
            check(first, "replay priming", "miss")
            hit = await connection.post(PATH, body)
            check(hit, "replay", "hit")
            events = hit.body.count(b"\n\n")
            chunks = [orjson.loads(b[6:]) for b in hit.body.split(b"\n\n")[:-2] if b]
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
            totals = []
            for _ in range(self.config.replays):
                reply = await connection.post(PATH, body)
                check(reply, "replay", "hit")
                totals.append(reply.total)
        finally:
            await connection.close()
        # The stored answer, for the in-process rate of the pure replay function.
        stored = orjson.dumps(
            {"id": chunks[0]["id"], "object": "chat.completion", "created": chunks[0]["created"],
             "model": MODEL, "choices": [{"index": 0, "finish_reason": "length", "logprobs": None,
             "message": {"role": "assistant", "content": text}}]}
        )  # fmt: skip
        started = time.perf_counter()
        for _ in range(self.config.replays):
            replay(stored, "chat", include_usage=False)
        pure = (time.perf_counter() - started) / self.config.replays
        mean = sum(totals) / len(totals)
        size = len(hit.body)
        return {
            "tokens": REPLAY_TOKENS,
            "text_chars": len(text),
            "events": events,
            "bytes": size,
            "replays": len(totals),
            "p50_ms": statistics.median(totals) * 1000,
            "p99_ms": percentile(totals, 0.99) * 1000,
            "replays_per_s": 1 / mean,
            "events_per_s": events / mean,
            "tokens_per_s": REPLAY_TOKENS / mean,
            "mb_per_s": size / mean / 1e6,
            "pure_ms": pure * 1000,
            "pure_tokens_per_s": REPLAY_TOKENS / pure,
        }


def summarise(samples: dict[str, dict[int, list[float]]], cpu: dict[str, float]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for row in ROWS:
        for concurrency in CONCURRENCIES:
            values = samples[row][concurrency]
            table[f"{row}/c{concurrency}"] = {
                "n": len(values),
                "p50_ms": statistics.median(values) * 1000,
                "p99_ms": percentile(values, 0.99) * 1000,
                "gateway_cpu_ms": cpu[f"{row}/c{concurrency}"],
            }
    for row in ("miss", "relay"):
        for concurrency in CONCURRENCIES:
            cell, direct = table[f"{row}/c{concurrency}"], table[f"direct/c{concurrency}"]
            cell["overhead_p50_ms"] = cell["p50_ms"] - direct["p50_ms"]
            cell["overhead_p99_ms"] = cell["p99_ms"] - direct["p99_ms"]
    return table


def render(table: dict[str, Any], rate: dict[str, Any], config: Config, redis: str) -> str:
    pinned = (
        f"gateway pinned to CPU {config.server_cpu}; engine, Redis and client on CPU "
        f"{config.client_cpu}"
        if config.server_cpu is not None
        else "no CPU pinning"
    )
    lines = [
        f"- machine: {os.cpu_count()} CPUs ({cpu_model()}), Linux {platform.release()}, "
        f"Python {platform.python_version()}, uvicorn {version('uvicorn')}, "
        f"httpx {version('httpx')}; {pinned}",
        f"- fake engine: first event after {config.first_token_ms:g} ms, then one token every "
        f"{config.token_ms:g} ms, {config.tokens} tokens per answer; L2: "
        f"{'a private redis-server' if redis != 'off' else 'off'}",
        f"- {config.rounds} interleaved round(s); requests per cell per round: "
        + ", ".join(f"c={c}: {n}" for c, n in config.requests.items()),
        "",
        "| path | conc | requests | TTFB p50 ms | TTFB p99 ms | overhead p50 ms | overhead p99 ms"
        " | gateway CPU ms / stream |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in ROWS:
        for concurrency in CONCURRENCIES:
            cell = table[f"{row}/c{concurrency}"]
            over = (
                f"{cell['overhead_p50_ms']:+.3f} | {cell['overhead_p99_ms']:+.3f}"
                if row != "direct"
                else "— | —"
            )
            gateway_cpu = f"{cell['gateway_cpu_ms']:.2f}" if row != "direct" else "—"
            lines.append(
                f"| {row} | {concurrency} | {cell['n']} | {cell['p50_ms']:.3f} | "
                f"{cell['p99_ms']:.3f} | {over} | {gateway_cpu} |"
            )

    lines += ["", "Targets: overhead p50 <= 1 ms, p99 <= 5 ms (the `miss` rows):"]
    for concurrency in CONCURRENCIES:
        cell = table[f"miss/c{concurrency}"]
        ok50 = cell["overhead_p50_ms"] <= OVERHEAD_P50_MAX_MS
        ok99 = cell["overhead_p99_ms"] <= OVERHEAD_P99_MAX_MS
        lines.append(
            f"- c={concurrency}: p50 {cell['overhead_p50_ms']:+.3f} ms "
            f"{'PASS' if ok50 else 'FAIL'}, p99 {cell['overhead_p99_ms']:+.3f} ms "
            f"{'PASS' if ok99 else 'FAIL'}"
        )
    lines += [
        "",
        f"Replay of a cached {rate['tokens']}-token answer ({rate['text_chars']} characters, "
        f"{rate['events']} SSE events, {rate['bytes']:,} bytes), {rate['replays']} sequential "
        "hits on one connection:",
        "",
        "| replays/s | events/s | tokens/s | MB/s | response p50 ms | p99 ms | replay() alone ms |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {rate['replays_per_s']:,.0f} | {rate['events_per_s']:,.0f} | "
        f"{rate['tokens_per_s']:,.0f} | {rate['mb_per_s']:.1f} | {rate['p50_ms']:.3f} | "
        f"{rate['p99_ms']:.3f} | {rate['pure_ms']:.3f} |",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--first-token-ms", type=float, default=20.0)
    # 50 tokens/s per stream, a GPU serving a mid-sized model: at c=32 the gateway relays about
    # 1,600 tokens/s besides the new streams whose first byte is being timed.
    parser.add_argument("--token-ms", type=float, default=20.0)
    parser.add_argument("--tokens", type=int, default=16, help="tokens per TTFB answer")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests-c1", type=int, default=100)
    parser.add_argument("--requests-c32", type=int, default=640)
    parser.add_argument("--replays", type=int, default=300)
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    args = parser.parse_args(argv)
    pin = not args.no_pin and shutil.which("taskset") is not None
    cpus = os.sched_getaffinity(0)
    if pin and not {args.server_cpu, args.client_cpu} <= cpus:
        raise SystemExit(f"CPUs {args.server_cpu} and {args.client_cpu} are not both available")
    if pin and args.server_cpu == args.client_cpu:
        raise SystemExit("--server-cpu and --client-cpu must differ")
    return Config(
        first_token_ms=args.first_token_ms,
        token_ms=args.token_ms,
        tokens=args.tokens,
        rounds=args.rounds,
        requests={1: args.requests_c1, 32: args.requests_c32},
        replays=args.replays,
        server_cpu=args.server_cpu if pin else None,
        client_cpu=args.client_cpu if pin else None,
    )


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally that kills our processes


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    workdir = Path(tempfile.mkdtemp(prefix="strata-bench-stream-"))
    procs = Processes(workdir)
    bench = Bench(config, procs)
    if config.client_cpu is not None:
        os.sched_setaffinity(0, {config.client_cpu})  # this client runs beside the engine
    try:
        bench.start()
        samples, cpu = asyncio.run(bench.ttfb())
        rate = asyncio.run(bench.replay_rate())
    except BenchError as exc:
        print(f"[bench] ERROR: {exc}\n[bench] process logs kept in {workdir}", file=sys.stderr)
        return 1
    finally:
        procs.stop_all()
    shutil.rmtree(workdir, ignore_errors=True)
    table = summarise(samples, cpu)
    print(render(table, rate, config, bench.redis))
    record = {"config": config.__dict__, "ttfb": table, "replay": rate}
    print(json.dumps(record, separators=(",", ":"), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
