"""L3 latency: hit end to end, what a miss adds, and search with 100k entries in a partition.

    .venv/bin/python -m bench.semantic_latency [--requests 200] [--entries 100000]

1. L3 hit: a gateway process (semantic on, real all-MiniLM-L6-v2 and verifier, L2 off so that only
   L1 could interfere — and an L3 hit is not promoted, so it cannot) in front of the fake engine;
   one question is stored, then a paraphrase is asked `--requests` times, sequentially; the client
   times each request. Every answer is checked to be an L3 hit.
2. L3 miss: unique questions; the gateway's own `Server-Timing: l3;dur=` is the time spent in L3
   (embedding + search + verification) before the engine call.
3. Search: an in-process `VectorIndex` with `--entries` random unit vectors of 384 dimensions in
   one partition (HNSW past 20k, as configured by default); p50/p99 of single searches.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from caches.vector_index import VectorIndex, single_threaded_search
from tests.redisproc import free_port

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = "You are the support assistant of an online shop."


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def start(args: list[str], env: dict[str, str], url: str, ready: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            if httpx.get(url + ready, timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{args} did not start")


def ask(client: httpx.Client, url: str, question: str) -> httpx.Response:
    body = {
        "model": "strata-fake", "temperature": 0,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
    }  # fmt: skip
    response = client.post(url + "/v1/chat/completions", json=body)
    response.raise_for_status()
    return response


def l3_server_ms(response: httpx.Response) -> float:
    for part in response.headers["server-timing"].split(", "):
        name, _, dur = part.partition(";dur=")
        if name == "l3":
            return float(dur)
    raise RuntimeError("no l3 timing: L3 was not consulted")


def gateway_numbers(requests: int) -> dict[str, float]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    engine_port, gateway_port = free_port(), free_port()
    engine_url, url = f"http://127.0.0.1:{engine_port}", f"http://127.0.0.1:{gateway_port}"
    engine = start(
        [sys.executable, "-m", "engine.fake", "--port", str(engine_port), "--answer-bytes", "400"],
        base, engine_url, "/health",
    )  # fmt: skip
    env = {**base, "STRATA_SEMANTIC": "on", "STRATA_REDIS_ENABLED": "false",
           "STRATA_LOG_LEVEL": "warning"}  # fmt: skip
    for name in ("STRATA_SEMANTIC_EMBED_THREADS", "STRATA_SEMANTIC_EMBED_DTYPE"):
        if value := os.environ.get(name):
            env[name] = value  # to compare thread counts and arithmetic
    gateway = start(
        [sys.executable, "-m", "gateway", "serve", "--engine-url", engine_url,
         "--port", str(gateway_port)],
        env, url, "/healthz",
    )  # fmt: skip
    try:
        with httpx.Client(timeout=30) as client:
            ask(client, url, "How do I reset my password?")
            hits, hit_l3 = [], []
            for _ in range(requests):
                started = time.perf_counter()
                response = ask(client, url, "How can I reset my password?")
                hits.append((time.perf_counter() - started) * 1000)
                if response.headers.get("x-strata-layer") != "l3":
                    raise RuntimeError(f"expected an L3 hit, got {dict(response.headers)}")
                hit_l3.append(l3_server_ms(response))
            misses = []
            for i in range(requests):
                response = ask(client, url, f"Question number {i} about order {i * 7919}?")
                if response.headers["x-strata-cache"] != "miss":
                    raise RuntimeError("expected a miss")
                misses.append(l3_server_ms(response))
    finally:
        for proc in (gateway, engine):
            proc.terminate()
            proc.wait(timeout=30)
    return {
        "hit_p50_ms": statistics.median(hits), "hit_p99_ms": pct(hits, 0.99),
        "hit_l3_server_p50_ms": statistics.median(hit_l3),
        "miss_added_p50_ms": statistics.median(misses), "miss_added_p99_ms": pct(misses, 0.99),
    }  # fmt: skip


def search_numbers(entries: int, queries: int = 1000) -> dict[str, float]:
    single_threaded_search()  # as in L3's worker thread
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(entries, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = VectorIndex(384, max_entries=entries, clock=time.time)
    started = time.perf_counter()
    far = time.time() + 3600
    for i in range(entries):
        index.add(f"e{i}", "one-partition", vectors[i], far)
    build = time.perf_counter() - started
    probes = vectors[rng.integers(0, entries, size=queries)] + rng.normal(
        scale=0.05, size=(queries, 384)
    ).astype(np.float32)
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)
    timings = []
    for probe in probes:
        t = time.perf_counter()
        index.search("one-partition", probe, k=4)
        timings.append((time.perf_counter() - t) * 1000)
    return {"entries": entries, "build_s": build, "search_p50_ms": statistics.median(timings),
            "search_p99_ms": pct(timings, 0.99)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    g = gateway_numbers(args.requests)
    s = search_numbers(args.entries)
    lines = [
        "| measure | p50 ms | p99 ms | target |",
        "|---|---:|---:|---|",
        f"| L3 hit, end to end through the gateway (client-timed) | {g['hit_p50_ms']:.2f} | "
        f"{g['hit_p99_ms']:.2f} | p50 <= 15 ms |",
        f"| L3 miss: time in L3 before the engine call (Server-Timing) | "
        f"{g['miss_added_p50_ms']:.2f} | {g['miss_added_p99_ms']:.2f} | p50 <= 10 ms |",
        f"| search, {s['entries']:,} entries in one partition (HNSW) | {s['search_p50_ms']:.3f} | "
        f"{s['search_p99_ms']:.3f} | p99 <= 5 ms |",
        "",
        f"- {args.requests} sequential requests each; L3 part of a hit (server): "
        f"{g['hit_l3_server_p50_ms']:.2f} ms p50; index built in {s['build_s']:.0f} s",
    ]
    text = "\n".join(lines)
    print(text)
    print(json.dumps({**g, **s}))
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
