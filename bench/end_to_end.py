"""End to end with the real engine: a realistic workload on vLLM CPU, directly and through Strata.

One vLLM CPU launch (the default model, prefix caching on, its compute thread bound to the server
CPU) serves every run. The workload (bench/workload.py: Zipf-distributed repeats, paraphrases of
earlier questions, four shared ~400-token system prompts, unique long-tail questions; temperature
0, short `max_tokens`) is replayed, the same sequence in the same order, by a closed-loop client
with a fixed concurrency (each worker sends the next request of the sequence when its last one is
answered) against:
  - `direct`:    vLLM itself;
  - `strata`:    a Strata gateway in front of it with its defaults (L1 + L2 on Redis, L3 off);
  - `strata-l3`: the same with the semantic cache on (L3).
Before each run the engine's prefix cache is emptied (vLLM's `/reset_prefix_cache`, served with
VLLM_SERVER_DEV_MODE=1) and each gateway starts with empty caches (its own Redis key prefix), so
every run starts cold. Per run: goodput (completed requests per second over the run's wall time),
latency p50/p99 as the client sees it, the share of requests served by each layer (from
`X-Strata-Cache` / `X-Strata-Layer`), and from vLLM's /metrics before and after: requests it
served, prompt tokens, prompt tokens served from its prefix cache (its hit rate), prompt tokens it
computed and tokens it generated: tokens computed (prompt tokens not served by its prefix cache,
plus generated tokens) measure the engine work a run costs, which other jobs on a shared machine
do not change (the CPU seconds of vLLM's processes are recorded in the JSON too, but they track
wall time: its CPU backend keeps polling while idle). L3 hits on a request whose intent had never
been asked before are counted as false hits (nothing correct could have been cached for it).

The gateway and this client are pinned to the client CPU; vLLM's compute thread to the server CPU
(VLLM_CPU_OMP_THREADS_BIND). The client is a few asyncio keep-alive connections: at the rates of
a CPU engine it uses a few percent of its CPU (printed), far from being the bottleneck.

    .venv/bin/python -m bench.end_to_end                        # 400 requests, concurrency 16
    .venv/bin/python -m bench.end_to_end --requests 120 --modes direct,strata
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench import hit_path, workload
from bench.hit_path import HOST, BenchError, Processes, free_port, group_cpu_seconds, wait_http
from bench.stream_ttfb import Connection
from engine.launcher import EngineLaunchError, EngineSupervisor, LaunchSpec
from engine.model import DEFAULT_SERVED_NAME, ModelError, default_model_dir, prepare_default_model

ROOT = Path(__file__).resolve().parents[1]
MODES = ("direct", "strata", "strata-l3")
PATH = "/v1/chat/completions"
METRICS = (
    "vllm:request_success_total",
    "vllm:prompt_tokens_total",
    "vllm:prompt_tokens_cached_total",
    "vllm:generation_tokens_total",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
)
GOODPUT_RATIO_MIN = 3.0  # issue 8


def log(message: str) -> None:
    print(f"[e2e] {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def parse_metrics(text: str) -> dict[str, float]:
    """Sums over labels of the vLLM counters in METRICS, from Prometheus' text format."""
    totals = dict.fromkeys(METRICS, 0.0)
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            with contextlib.suppress(ValueError):
                totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


def source(headers: dict[str, str], mode: str) -> str:
    """Who answered: `engine` (direct, or a Strata miss), `l1`/`l2`/`l3`, or `coalesced`."""
    if mode == "direct":
        return "engine"
    cache = headers.get("x-strata-cache", "")
    if cache == "hit":
        return headers.get("x-strata-layer", "hit?")
    if cache == "coalesced":
        return "coalesced"
    return "engine"  # miss, bypass


async def replay(
    port: int, items: list[workload.Item], bodies: list[bytes], concurrency: int, mode: str
) -> tuple[list[dict[str, Any]], float]:
    """Send every body in order from `concurrency` closed-loop workers; records and wall seconds."""
    records: list[dict[str, Any]] = [{} for _ in items]
    feed = iter(range(len(items)))

    async def worker() -> None:
        connection = Connection(port)
        try:
            for index in feed:
                started = time.perf_counter()
                try:
                    reply = await connection.post(PATH, bodies[index], timeout=600)
                except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                    await connection.close()
                    connection = Connection(port)
                    records[index] = {"status": 0, "error": repr(exc)}
                    continue
                elapsed = time.perf_counter() - started
                text = ""
                if reply.status == 200:
                    with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
                        text = orjson.loads(reply.body)["choices"][0]["message"]["content"]
                records[index] = {
                    "status": reply.status,
                    "seconds": elapsed,
                    "source": source(reply.headers, mode),
                    "similarity": reply.headers.get("x-strata-similarity"),
                    "chars": len(text),
                }
        finally:
            await connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return records, time.perf_counter() - started


class Bench:
    def __init__(self, args: argparse.Namespace, procs: Processes, workdir: Path) -> None:
        self.args = args
        self.procs = procs
        self.workdir = workdir
        self.items = workload.generate(
            args.requests,
            seed=args.seed,
            zipf=args.zipf,
            unique_share=args.unique_share,
            paraphrase_share=args.paraphrase_share,
        )
        self.bodies = [
            orjson.dumps(item.body(DEFAULT_SERVED_NAME, args.max_tokens)) for item in self.items
        ]
        self.engine: EngineSupervisor | None = None
        self.engine_port = 0
        self.redis_url = args.redis_url
        self.prefix = f"bench-e2e-{os.getpid()}-{int(time.time())}"

    async def start_engine(self) -> None:
        python = self.args.engine_python
        data_dir = Path(self.args.data_dir)
        try:
            model = str(prepare_default_model(python, default_model_dir(data_dir)))
        except ModelError as exc:
            raise BenchError(str(exc)) from exc
        # The dev routes give /reset_prefix_cache; the compute thread goes to the server CPU.
        os.environ["VLLM_SERVER_DEV_MODE"] = "1"
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(self.args.server_cpu)
        self.engine_port = free_port()
        spec = LaunchSpec(
            python=python, model=model, served_model_name=DEFAULT_SERVED_NAME, device="cpu",
            port=self.engine_port, max_model_len=2048, cpu_kv_cache_gib=2,
            log_path=data_dir / "logs" / "bench-e2e-vllm.log",
        )  # fmt: skip
        self.engine = EngineSupervisor(spec, start_timeout=1200)
        started = time.monotonic()
        try:
            await self.engine.start()
        except EngineLaunchError as exc:
            raise BenchError(str(exc)) from exc
        log(f"vLLM up in {time.monotonic() - started:.0f} s at {spec.url} (log {spec.log_path})")

    def engine_cpu(self) -> float:
        """CPU seconds used so far by vLLM's processes (its own process group)."""
        pid = self.engine.pid if self.engine is not None else None
        return group_cpu_seconds(pid) if pid else 0.0

    async def engine_get(self, path: str) -> str:
        async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
            response = await client.get(f"http://{HOST}:{self.engine_port}{path}")
            response.raise_for_status()
            return response.text

    async def reset_prefix_cache(self) -> bool:
        async with httpx.AsyncClient(timeout=60, trust_env=False) as client:
            with contextlib.suppress(httpx.HTTPError):
                url = f"http://{HOST}:{self.engine_port}/reset_prefix_cache"
                response = await client.post(url)
                return response.status_code == 200
        return False

    async def warm_engine(self) -> None:
        """A few requests outside the workload (first-request compilation, buffers)."""
        body = {
            "model": DEFAULT_SERVED_NAME,
            "messages": [{"role": "user", "content": "Say hello to a new colleague."}],
            "temperature": 0,
            "max_tokens": self.args.max_tokens,
        }
        async with httpx.AsyncClient(timeout=600, trust_env=False) as client:
            url = f"http://{HOST}:{self.engine_port}{PATH}"
            for _ in range(3):
                (await client.post(url, json=body)).raise_for_status()
            await asyncio.gather(
                *(client.post(url, json=body) for _ in range(self.args.concurrency))
            )

    def start_gateway(self, mode: str) -> tuple[hit_path.Proc, int]:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("STRATA_", "VLLM_"))}
        env["PYTHONPATH"] = str(ROOT)
        env.update(
            STRATA_REDIS_URL=self.redis_url,
            STRATA_REDIS_KEY_PREFIX=f"{self.prefix}-{mode}",
            STRATA_LOG_LEVEL="warning",
            STRATA_SEMANTIC="on" if mode == "strata-l3" else "off",
            STRATA_SEMANTIC_EMBED_THREADS="1",
        )
        proc = self.procs.start(
            mode,
            [sys.executable, "-m", "gateway", "serve", "--engine-url",
             f"http://{HOST}:{self.engine_port}", "--host", HOST, "--port", str(port)],
            env=env, cpu=self.args.client_cpu,
        )  # fmt: skip
        wait_http(proc, port, "/readyz", timeout=240)
        return proc, port

    async def run_mode(self, mode: str) -> dict[str, Any]:
        reset = await self.reset_prefix_cache()
        proc, port = (None, self.engine_port) if mode == "direct" else self.start_gateway(mode)
        try:
            before = parse_metrics(await self.engine_get("/metrics"))
            gateway_cpu = group_cpu_seconds(proc.popen.pid) if proc else 0.0
            engine_cpu = self.engine_cpu()
            client_cpu = time.process_time()
            log(f"{mode}: replaying {len(self.items)} requests at concurrency"
                f" {self.args.concurrency}")  # fmt: skip
            records, wall = await replay(port, self.items, self.bodies, self.args.concurrency, mode)
            client_cpu = time.process_time() - client_cpu
            gateway_cpu = (group_cpu_seconds(proc.popen.pid) - gateway_cpu) if proc else 0.0
            engine_cpu = self.engine_cpu() - engine_cpu
            await asyncio.sleep(1.5)  # vLLM publishes its counters every second or so
            after = parse_metrics(await self.engine_get("/metrics"))
        finally:
            if proc is not None:
                self.procs.stop(proc)
        result = summarise_run(mode, self.items, records, wall, before, after)
        result["prefix_cache_reset"] = reset
        result["client_cpu_s"] = round(client_cpu, 2)
        result["gateway_cpu_s"] = round(gateway_cpu, 2)
        result["engine_cpu_s"] = round(engine_cpu, 2)
        result["goodput_per_engine_cpu_s"] = (
            round(result["ok"] / engine_cpu, 3) if engine_cpu > 0 else 0.0
        )
        log(
            f"{mode}: {result['ok']} ok in {wall:.1f} s: goodput {result['goodput']:.2f} req/s,"
            f" p50 {result['p50_ms']:.0f} ms, p99 {result['p99_ms']:.0f} ms, sources"
            f" {result['sources']}, engine prefix-cache hit rate"
            f" {100 * result['engine']['prefix_cache_hit_rate']:.1f}%"
        )
        return result

    async def run(self) -> dict[str, Any]:
        await self.start_engine()
        try:
            os.sched_setaffinity(0, {self.args.client_cpu})  # this client, from here on
            await self.warm_engine()
            runs, failed = {}, {}
            for mode in self.args.modes:
                try:
                    runs[mode] = await self.run_mode(mode)
                except BenchError as exc:
                    lines = [line for line in str(exc).splitlines() if line.strip()]
                    failed[mode] = " / ".join(lines[:2] + lines[-1:])[:600]
                    log(f"{mode} is left out of this run: {failed[mode]}")
            version = str(json.loads(await self.engine_get("/version")).get("version"))
        finally:
            os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
            if self.engine is not None:
                await self.engine.stop()
        return {
            "workload": workload.describe(self.items),
            "runs": runs,
            "ratios": ratios(runs, "goodput"),
            "cpu_ratios": ratios(runs, "goodput_per_engine_cpu_s"),
            "vllm_version": version,
            "failed": failed,
        }


def ratios(runs: dict[str, dict[str, Any]], key: str) -> dict[str, float]:
    """Each Strata run's `key` over the direct run's."""
    base = runs.get("direct", {}).get(key)
    return {
        mode: round(run[key] / base, 2) for mode, run in runs.items() if mode != "direct" and base
    }


def summarise_run(
    mode: str,
    items: list[workload.Item],
    records: list[dict[str, Any]],
    wall: float,
    before: dict[str, float],
    after: dict[str, float],
) -> dict[str, Any]:
    ok = [r for r in records if r.get("status") == 200]
    seconds = [r["seconds"] for r in ok]
    sources = Counter(r["source"] for r in ok)
    by_kind: dict[str, dict[str, int]] = {}
    for item, record in zip(items, records, strict=True):
        if record.get("status") == 200:
            cell = by_kind.setdefault(item.kind, {})
            cell[record["source"]] = cell.get(record["source"], 0) + 1
    false_l3 = sum(
        1
        for item, record in zip(items, records, strict=True)
        if record.get("source") == "l3" and item.kind in ("new", "unique")
    )
    delta = {name: after[name] - before[name] for name in METRICS}
    prompt = delta["vllm:prompt_tokens_total"]
    cached = delta["vllm:prompt_tokens_cached_total"]
    queries = delta["vllm:prefix_cache_queries_total"]
    hits = delta["vllm:prefix_cache_hits_total"]
    generated = delta["vllm:generation_tokens_total"]
    served = {name: sources.get(name, 0) for name in ("engine", "coalesced", "l1", "l2", "l3")}
    total = max(1, len(ok))
    return {
        "mode": mode,
        "requests": len(records),
        "ok": len(ok),
        "failed": len(records) - len(ok),
        "errors": [r.get("error") or r.get("status") for r in records if r.get("status") != 200][
            :5
        ],
        "wall_s": round(wall, 2),
        "goodput": round(len(ok) / wall, 3) if wall else 0.0,
        "p50_ms": round(statistics.median(seconds) * 1000, 1) if seconds else 0.0,
        "p99_ms": round(percentile(seconds, 0.99) * 1000, 1) if seconds else 0.0,
        "mean_ms": round(statistics.fmean(seconds) * 1000, 1) if seconds else 0.0,
        "sources": served,
        "shares": {name: round(count / total, 4) for name, count in served.items()},
        "by_kind": by_kind,
        "l3_false_hits": false_l3,
        "engine": {
            "requests": int(delta["vllm:request_success_total"]),
            "prompt_tokens": int(prompt),
            "prompt_tokens_cached": int(cached),
            "prompt_tokens_computed": int(prompt - cached),
            "generated_tokens": int(generated),
            "tokens_computed": int(prompt - cached + generated),
            "prefix_cache_queries": int(queries),
            "prefix_cache_hits": int(hits),
            "prefix_cache_hit_rate": round(hits / queries, 4) if queries else 0.0,
        },
    }


def render_markdown(record: dict[str, Any]) -> str:
    cfg, wl = record["config"], record["workload"]
    runs, ratios = record["runs"], record["ratios"]
    shares = wl["shares"]
    lines = [
        f"- engine: vLLM {record['vllm_version']} CPU, {DEFAULT_SERVED_NAME} (float32), prefix"
        f" caching on, compute thread bound to CPU {cfg['server_cpu']}; gateway and client on"
        f" CPU {cfg['client_cpu']}",
        f"- workload (bench/workload.py, seed {cfg['seed']}): {wl['requests']} chat requests over"
        f" 4 apps with shared ~400-token system prompts; Zipf s={cfg['zipf']:g} over 48 intents,"
        f" {100 * cfg['unique_share']:.0f}% unique long-tail questions, reworded"
        f" {100 * cfg['paraphrase_share']:.0f}% of the time; temperature 0, max_tokens"
        f" {cfg['max_tokens']}; closed loop, concurrency {cfg['concurrency']}; the same sequence"
        " for every run",
        f"- what the workload holds: {100 * shares['new']:.1f}% first asks of an intent,"
        f" {100 * shares['repeat']:.1f}% exact repeats, {100 * shares['paraphrase']:.1f}%"
        f" rewordings of an intent asked before, {100 * shares['unique']:.1f}% unique: an exact"
        f" cache can serve at most {100 * wl['exact_cache_bound']:.1f}%, a semantic one"
        f" {100 * wl['semantic_cache_bound']:.1f}%",
        "",
        "| run | goodput req/s | x direct | p50 ms | p99 ms | engine | coalesced | L1 | L2 | L3 |"
        " engine requests | prefix-cache hit rate | prompt tokens computed | tokens generated |"
        " tokens computed | x fewer than direct | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    direct_work = runs.get("direct", {}).get("engine", {}).get("tokens_computed")
    for mode, run in runs.items():
        share, engine = run["shares"], run["engine"]
        ratio = f"{ratios[mode]:.2f}" if mode in ratios else "1.00"
        work = engine["tokens_computed"]
        fewer = direct_work / work if direct_work and work else 0.0
        lines.append(
            f"| {mode} | {run['goodput']:.2f} | {ratio} | {run['p50_ms']:,.0f} |"
            f" {run['p99_ms']:,.0f} | {100 * share['engine']:.1f}% |"
            f" {100 * share['coalesced']:.1f}% | {100 * share['l1']:.1f}% |"
            f" {100 * share['l2']:.1f}% | {100 * share['l3']:.1f}% | {engine['requests']} |"
            f" {100 * engine['prefix_cache_hit_rate']:.1f}% |"
            f" {engine['prompt_tokens_computed']:,} | {engine['generated_tokens']:,} |"
            f" {engine['tokens_computed']:,} | {fewer:.2f} | {run['wall_s']:.0f} |"
        )
    lines.append("")
    for mode, run in runs.items():
        notes = []
        if run["failed"]:
            notes.append(f"{run['failed']} failed ({run['errors']})")
        if mode == "strata-l3":
            para = run["by_kind"].get("paraphrase", {})
            notes.append(
                f"rewordings served by L3: {para.get('l3', 0)} of {sum(para.values())};"
                f" L3 hits on a never-asked intent (false hits): {run['l3_false_hits']}"
            )
        if not run["prefix_cache_reset"]:
            notes.append("the engine's prefix cache could not be reset before this run")
        notes.append(
            f"client CPU {run['client_cpu_s']:.1f} s, gateway CPU {run['gateway_cpu_s']:.1f} s"
            f" over {run['wall_s']:.0f} s"
        )
        lines.append(f"- {mode}: " + "; ".join(notes))
    for mode, reason in record.get("failed", {}).items():
        lines.append(f"- {mode} could not be measured in this run: {reason}")
    for mode, ratio in ratios.items():
        lines.append(
            f"- goodput {mode} / direct: **{ratio:.2f}x** (target >= {GOODPUT_RATIO_MIN:g}x):"
            f" {hit_path.verdict(ratio >= GOODPUT_RATIO_MIN)}"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=8)
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--unique-share", type=float, default=0.15)
    parser.add_argument("--paraphrase-share", type=float, default=0.25)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument(
        "--engine-python",
        default=os.environ.get(
            "STRATA_ENGINE_PYTHON", str(ROOT / ".venv-engine" / "bin" / "python")
        ),
    )
    parser.add_argument("--data-dir", default=os.environ.get("STRATA_DATA_DIR", str(ROOT / ".run")))
    parser.add_argument(
        "--redis-url", default=os.environ.get("STRATA_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.modes = hit_path.parse_list(args.modes, MODES, "modes")
    if args.requests < 1 or args.concurrency < 1:
        parser.error("--requests and --concurrency must be >= 1")
    return args


def cleanup_redis(url: str, prefix: str) -> None:
    import redis  # noqa: PLC0415

    with contextlib.suppress(redis.RedisError, OSError):
        client = redis.Redis.from_url(url, socket_timeout=2)
        keys = list(client.scan_iter(match=f"{prefix}-*", count=1000))
        if keys:
            client.unlink(*keys)
        client.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, hit_path._terminate)
    workdir = Path(tempfile.mkdtemp(prefix="strata-e2e-"))
    procs = Processes(workdir)
    bench = Bench(args, procs, workdir)
    started = time.monotonic()
    try:
        summary = asyncio.run(bench.run())
    except BenchError as exc:
        print(f"[e2e] ERROR: {exc}\n[e2e] logs kept in {workdir}", file=sys.stderr)
        return 1
    finally:
        procs.stop_all()
        cleanup_redis(bench.redis_url, bench.prefix)
    shutil.rmtree(workdir, ignore_errors=True)
    record = {
        "config": {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "max_tokens": args.max_tokens,
            "seed": args.seed,
            "zipf": args.zipf,
            "unique_share": args.unique_share,
            "paraphrase_share": args.paraphrase_share,
            "modes": list(args.modes),
            "server_cpu": args.server_cpu,
            "client_cpu": args.client_cpu,
        },
        "elapsed_s": round(time.monotonic() - started, 1),
        **summary,
    }
    print(render_markdown(record))
    print(json.dumps(record, separators=(",", ":")))
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
