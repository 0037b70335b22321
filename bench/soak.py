"""Soak: a real gateway under steady mixed load for minutes; does its memory stay flat, and does
L1 stay inside its byte cap?

Processes (own process groups, all killed at the end): the fake engine, a private redis-server,
the gateway (`strata serve`, L1 capped at --l1-mb so that eviction runs all the time). The load:
--rate requests/s from --workers keep-alive connections, a mix of repeats (hits), new questions
(misses, stored, evicting), streams, and invalid bodies (400s). Every --every seconds it reads the
gateway's resident memory (/proc) and L1's bytes (`strata_cache_bytes{layer="l1"}` on /metrics).

Verdicts: resident memory at the end vs after --warmup minutes (growth < 10%), and L1 bytes never
above the cap. Not part of `make test` (it runs for --minutes, 10 by default):

    .venv/bin/python -m bench.soak                   # 10 minutes
    .venv/bin/python -m bench.soak --minutes 2 --warmup 0.5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from bench.hit_path import HOST, BenchError, Proc, Processes, free_port, wait_http
from bench.stream_ttfb import Connection

MODEL = "strata-fake"
PATH = "/v1/chat/completions"


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for pid {pid}")


def l1_bytes(metrics: str) -> float | None:
    for line in metrics.splitlines():
        if line.startswith('strata_cache_bytes{layer="l1"}'):
            return float(line.rsplit(" ", 1)[1])
    return None


def body(n: int, tag: str) -> bytes:
    kind = n % 10
    if kind == 9:
        return b'{"model": "strata-fake", "messages": []}'  # 400
    content = f"repeat {n % 50}" if kind < 5 else f"new {tag} {n}"
    return orjson.dumps(
        {"model": MODEL, "temperature": 0, "stream": kind in (3, 7),
         "messages": [{"role": "user", "content": content}]}
    )  # fmt: skip


async def drive(
    port: int,
    rate: float,
    workers: int,
    until: float,
    counts: dict[str, int],
    make_body: Callable[[int], bytes],
) -> None:
    """`workers` connections posting `make_body(n)` for n = 0, 1, ... at `rate` requests per
    second in all until `until` (monotonic); `counts` tallies the replies by `X-Strata-Cache`
    (or status), and broken connections as `client-error` (the connection is replaced)."""
    interval = workers / rate
    sequence = iter(range(10**12))

    async def worker() -> None:
        connection = Connection(port)
        try:
            next_at = time.monotonic()
            while time.monotonic() < until:
                body = make_body(next(sequence))
                try:
                    reply = await connection.post(PATH, body, timeout=30)
                    key = reply.headers.get("x-strata-cache") or str(reply.status)
                except (OSError, TimeoutError, asyncio.IncompleteReadError):
                    await connection.close()
                    connection = Connection(port)
                    key = "client-error"
                counts[key] = counts.get(key, 0) + 1
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        finally:
            await connection.close()

    await asyncio.gather(*(worker() for _ in range(workers)))


async def sample(port: int) -> str:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(f"GET /metrics HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()
    return data.decode("utf-8", "replace")


async def soak(args: argparse.Namespace, gateway_pid: int, port: int) -> dict[str, Any]:
    started = time.monotonic()
    until = started + args.minutes * 60
    counts: dict[str, int] = {}
    samples: list[dict[str, float]] = []
    tag = uuid.uuid4().hex[:8]
    load = asyncio.create_task(
        drive(port, args.rate, args.workers, until, counts, lambda n: body(n, tag))
    )
    while not load.done():
        metrics = await sample(port)
        samples.append({
            "t": time.monotonic() - started,
            "rss": rss_bytes(gateway_pid),
            "l1": l1_bytes(metrics) or 0.0,
        })  # fmt: skip
        print(
            f"[soak] {samples[-1]['t']:6.0f} s  rss {samples[-1]['rss'] / 2**20:7.1f} MiB  "
            f"l1 {samples[-1]['l1'] / 2**20:6.2f} MiB  replies {counts}",
            file=sys.stderr,
            flush=True,
        )
        await asyncio.wait({load}, timeout=args.every)
    await load
    warm = [s for s in samples if s["t"] >= args.warmup * 60]
    if not warm:
        raise BenchError("the run ended before the warm-up did: use a longer --minutes")
    base, end = warm[0]["rss"], warm[-1]["rss"]
    cap = args.l1_mb * 2**20
    return {
        "minutes": args.minutes,
        "rate": args.rate,
        "replies": counts,
        "rss_after_warmup_mib": round(base / 2**20, 1),
        "rss_end_mib": round(end / 2**20, 1),
        "rss_max_mib": round(max(s["rss"] for s in warm) / 2**20, 1),
        "rss_growth": round(end / base - 1, 4),
        "l1_cap_mib": args.l1_mb,
        "l1_max_mib": round(max(s["l1"] for s in samples) / 2**20, 3),
        "rss_ok": end / base - 1 < 0.10,
        "l1_ok": max(s["l1"] for s in samples) <= cap,
    }


def start_fake_stack(
    procs: Processes,
    *,
    engine_args: list[str],
    gateway_env: dict[str, str],
    ready_timeout: float = 120.0,
) -> tuple[Proc, Proc, int]:
    """The fake engine, a private redis-server and `strata serve` in front of them, each a
    process of `procs`, started and answering: (gateway, redis, the gateway's port)."""
    python = sys.executable
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    engine_port, redis_port, port = free_port(), free_port(), free_port()
    engine = procs.start(
        "engine",
        [python, "-m", "engine.fake", "--host", HOST, "--port", str(engine_port),
         "--model", MODEL, *engine_args],
        env=env, cpu=None,
    )  # fmt: skip
    wait_http(engine, engine_port, "/health")
    server = shutil.which("redis-server")
    if server is None:
        raise BenchError("redis-server not found")
    redis = procs.start(
        "redis",
        [server, "--port", str(redis_port), "--bind", HOST, "--save", "", "--appendonly", "no"],
        cpu=None,
    )
    gateway = procs.start(
        "gateway",
        [python, "-m", "gateway", "serve", "--engine-url", f"http://{HOST}:{engine_port}",
         "--host", HOST, "--port", str(port)],
        env={**env, "STRATA_LOG_LEVEL": "warning", "STRATA_SEMANTIC": "off",
             "STRATA_REDIS_URL": f"redis://{HOST}:{redis_port}/0", **gateway_env},
        cpu=None,
    )  # fmt: skip
    wait_http(gateway, port, "/readyz", timeout=ready_timeout)
    return gateway, redis, port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0, help="minutes before the baseline")
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second")
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--every", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--l1-mb", type=int, default=4, help="L1 byte cap, MiB")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="strata-soak-"))
    procs = Processes(workdir)
    try:
        gateway, _, port = start_fake_stack(
            procs,
            engine_args=["--answer-bytes", "2000"],
            gateway_env={"STRATA_L1_MAX_BYTES": str(args.l1_mb * 2**20)},
        )
        result = asyncio.run(soak(args, gateway.popen.pid, port))
    except BenchError as exc:
        print(f"[soak] ERROR: {exc}\n[soak] logs in {workdir}", file=sys.stderr)
        return 1
    finally:
        procs.stop_all()
    shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"resident memory after {args.warmup:g} min warm-up {result['rss_after_warmup_mib']} MiB, "
        f"at the end {result['rss_end_mib']} MiB (max {result['rss_max_mib']}): growth "
        f"{result['rss_growth']:+.1%} (< 10%: {'PASS' if result['rss_ok'] else 'FAIL'})\n"
        f"L1 bytes at most {result['l1_max_mib']} MiB, cap {args.l1_mb} MiB: "
        f"{'PASS' if result['l1_ok'] else 'FAIL'}\n"
        f"replies (by X-Strata-Cache, else HTTP status): {result['replies']}"
    )
    print(json.dumps(result))
    return 0 if result["rss_ok"] and result["l1_ok"] else 2


if __name__ == "__main__":
    sys.exit(main())
