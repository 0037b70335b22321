"""Miss overhead: what a gateway adds to a request its cache cannot answer, vs the engine itself.

The engine is the fake one (`engine.fake --delay`) with a fixed delay before every answer (50 ms by
default), pinned with `wrk` and Redis to the client CPU. Every request is a new question (the wrk
script numbers them: `@@N@@` in the body), so every one goes to the engine. Targets:
  - `direct`:    wrk straight to the engine;
  - `strata`:    the Strata gateway with its defaults (L1 + L2 on Redis; L3 is off by default):
                 L1 lookup, L2 presence check, one engine call, the store in L1 and (in the
                 background) L2; every response must say `X-Strata-Cache: miss`;
  - `strata-l3`: the same with the semantic cache on: each miss also embeds the question, searches
                 and, after the answer, stores it in L3 (its own row: L3 is opt-in);
  - `litellm`:   LiteLLM's proxy with its Redis cache (bench/peers/litellm.py): cache lookup, the
                 engine call, the cache write; no response may carry its cache-hit header.
Each gateway is one worker pinned to the server CPU. At concurrency 1 and 32, rounds interleaving
the targets; the table shows p50/p99 latency, what the gateway adds to the direct p50/p99, RPS
and the throughput lost against direct, and the gateway's CPU time per request (its process
group's CPU seconds over the cell / requests: a cost that other tenants of a shared machine do
not change). The engine's call count must grow by at least the requests completed: every
answer came from the engine.

    .venv/bin/python -m bench.miss_overhead                      # 8 s per cell, 2 rounds
    .venv/bin/python -m bench.miss_overhead --targets direct,strata --rounds 1 --duration 5
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import hit_path
from bench.hit_path import (
    HOST,
    MODEL,
    BenchError,
    Expect,
    Processes,
    engine_calls,
    free_port,
    group_cpu_seconds,
    machine_info,
    run_wrk,
    wait_http,
)
from bench.peers import litellm

TARGETS = ("direct", "strata", "strata-l3", "litellm")
# Every question is new, so a cache hit is a false hit: counted and shown up to this share of a
# cell (L3's verifier may accept a question that differs only in its numbers), fatal past it.
MAX_HIT_SHARE = 0.02
CONCURRENCIES = (1, 32)
PEERS = ("litellm",)


def body_template() -> str:
    """A request whose question is new for every `@@N@@` (wrk's counter, from 1 in every cell).

    The cell's own part is a random number, not an opaque tag: L3's verifier tells questions with
    different numbers apart, but (measured) serves questions that differ only in a hex identifier
    from each other's answers."""
    cell = random.randrange(100_000, 999_999)
    return json.dumps(
        {
            "model": MODEL,
            "messages": [
                {
                    "role": "user",
                    "content": f"Order {cell}-@@N@@: how many of the @@N@@ parcels of shipment"
                    f" {cell} left the warehouse?",
                }
            ],
            "temperature": 0,
            "max_tokens": 300,
        },
        separators=(",", ":"),
    )


@dataclass
class Sample:
    target: str
    concurrency: int
    round: int
    rps: float
    p50_us: int
    p99_us: int
    requests: int
    errors: int
    server_cpu_ms_per_request: float
    engine_calls: int
    hits: int = 0  # answers from a cache although every question was new (false hits)


@dataclass
class Config:
    delay_ms: float
    duration: int
    rounds: int
    stat: str
    targets: tuple[str, ...]
    concurrencies: tuple[int, ...]
    redis_url: str
    server_cpu: int
    client_cpu: int
    wrk: str
    json_out: Path | None


class Bench:
    def __init__(self, config: Config, procs: Processes, workdir: Path) -> None:
        self.config = config
        self.procs = procs
        self.workdir = workdir
        self.prefix = f"bench-miss-{os.getpid()}-{int(time.time())}"
        self.engine_url = ""
        self.samples: list[Sample] = []
        self.targets = list(config.targets)
        self.peers: dict[str, dict[str, str]] = {}
        self.failed: dict[str, str] = {}
        # The Redis plumbing of the hit-path benchmark (reachable URL or a private server).
        self.redis = hit_path.Bench(
            hit_path.Config(
                duration=1, warmup=0, rounds=1, stat="best", redis_url=config.redis_url,
                server_cpu=config.server_cpu, client_cpu=config.client_cpu, gateway_cmd=[],
                wrk=config.wrk, out=None, check=False, private_redis=False,
            ),
            procs,
            workdir,
        )  # fmt: skip
        self.redis.prefix = self.prefix

    def log(self, message: str) -> None:
        print(f"[miss] {message}", file=sys.stderr, flush=True)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
        env["PYTHONPATH"] = str(hit_path.ROOT)
        env.update(extra)
        return env

    def start_engine(self) -> None:
        port = free_port()
        proc = self.procs.start(
            "engine",
            [sys.executable, "-m", "engine.fake", "--host", HOST, "--port", str(port),
             "--model", MODEL, "--answer-bytes", "1000",
             "--delay", str(self.config.delay_ms / 1000)],
            env=self.env(), cpu=self.config.client_cpu,
        )  # fmt: skip
        wait_http(proc, port, "/health")
        self.engine_url = f"http://{HOST}:{port}"

    def prepare_peers(self) -> None:
        if "litellm" not in self.targets:
            return
        try:
            version = litellm.ensure_installed(self.log)
        except (litellm.PeerUnavailable, OSError) as exc:
            self.log(f"LiteLLM is left out: {exc}")
            self.peers["litellm"] = {"spec": litellm.spec(), "error": str(exc)}
            self.targets.remove("litellm")
            return
        self.peers["litellm"] = {"spec": litellm.spec(), "version": version}

    def start_server(self, target: str) -> tuple[hit_path.Proc | None, int]:
        if target == "direct":
            return None, int(self.engine_url.rsplit(":", 1)[1])
        port = free_port()
        if target == "litellm":
            config = litellm.write_config(
                self.workdir / "litellm.yaml",
                model=MODEL,
                engine_url=self.engine_url,
                redis_url=self.redis.redis_url,
                namespace=f"{self.prefix}:litellm",
            )
            cmd = litellm.command(config, host=HOST, port=port)
            env, ready = litellm.environment(dict(os.environ)), "/health/liveliness"
        else:
            cmd = [sys.executable, "-m", "gateway", "serve", "--engine-url", self.engine_url,
                   "--host", HOST, "--port", str(port)]  # fmt: skip
            env = self.env(
                STRATA_REDIS_URL=self.redis.redis_url,
                STRATA_REDIS_KEY_PREFIX=self.prefix,
                STRATA_LOG_LEVEL="warning",
                STRATA_SEMANTIC="on" if target == "strata-l3" else "off",
                STRATA_SEMANTIC_EMBED_THREADS="1",
            )
            ready = "/readyz"
        proc = self.procs.start(target, cmd, env=env, cpu=self.config.server_cpu)
        wait_http(proc, port, ready, timeout=180)
        return proc, port

    def expect(self, target: str) -> Expect:
        if target == "litellm":
            return Expect(unique=True, forbid_header=litellm.CACHE_HIT_HEADER)
        if target.startswith("strata"):
            return Expect(unique=True, cache="miss")
        return Expect(unique=True)

    def first_requests(self, target: str, port: int, count: int = 5) -> None:
        """A few sequential new questions, unhurried: a peer's first call may take seconds."""
        template = body_template()
        conn = http.client.HTTPConnection(HOST, port, timeout=60)
        try:
            for n in range(count):
                reply = hit_path.post(conn, template.replace("@@N@@", str(n)))
                if reply.status != 200:
                    raise BenchError(f"{target}: first requests fail: {reply.describe()}")
        finally:
            conn.close()

    def measure(self, target: str, round_no: int) -> None:
        cfg = self.config
        proc, port = self.start_server(target)
        try:
            expect = self.expect(target)
            self.first_requests(target, port)
            # Unrecorded warm-up: connections, pools, first-request paths.
            run_wrk(cfg.wrk, port, connections=4, duration=2, client_cpu=cfg.client_cpu,
                    label=f"{target} warm-up", body=body_template(),
                    expect=expect, tolerate_errors=target in PEERS,
                    max_miss_share=MAX_HIT_SHARE)  # fmt: skip
            for conc in cfg.concurrencies:
                label = f"round {round_no} {target} c={conc}"
                calls = engine_calls(self.engine_url)
                cpu = group_cpu_seconds(proc.popen.pid) if proc else 0.0
                stats, _ = run_wrk(
                    cfg.wrk, port, connections=conc, duration=cfg.duration,
                    client_cpu=cfg.client_cpu, label=label,
                    body=body_template(), expect=expect,
                    tolerate_errors=target in PEERS, timeout_s=10, max_miss_share=MAX_HIT_SHARE,
                )  # fmt: skip
                cpu = (group_cpu_seconds(proc.popen.pid) - cpu) if proc else 0.0
                calls = engine_calls(self.engine_url) - calls
                hits = stats.get("not_hit", 0)
                done = stats["requests"] - stats["errors"] - hits
                if calls < done:
                    raise BenchError(
                        f"{label}: {done} answers but only {calls} engine calls: some answers"
                        " did not come from the engine"
                    )
                if proc is not None and proc.popen.poll() is not None:
                    raise BenchError(f"{target} died during the run:\n{proc.tail()}")
                sample = Sample(
                    target=target,
                    concurrency=conc,
                    round=round_no,
                    rps=round(stats["rps"], 1),
                    p50_us=stats["p50_us"],
                    p99_us=stats["p99_us"],
                    requests=stats["requests"],
                    errors=stats["errors"],
                    server_cpu_ms_per_request=round(1000 * cpu / max(1, stats["requests"]), 3),
                    engine_calls=calls,
                    hits=hits,
                )
                self.samples.append(sample)
                self.log(
                    f"{label}: {sample.rps:.0f} req/s, p50 {sample.p50_us / 1000:.2f} ms, p99"
                    f" {sample.p99_us / 1000:.2f} ms, gateway CPU"
                    f" {sample.server_cpu_ms_per_request:.2f} ms/request"
                    + (f", {sample.errors} errors" if sample.errors else "")
                    + (f", {sample.hits} cache hits on new questions" if sample.hits else "")
                )
        finally:
            if proc is not None:
                self.procs.stop(proc)

    def drop(self, target: str, exc: BaseException) -> None:
        """Leave a target out of the run (the others go on), keeping why for the report."""
        lines = [line for line in str(exc).splitlines() if line.strip()]
        reason = " / ".join(lines[:2] + (lines[-1:] if len(lines) > 2 else []))[:600]
        self.log(f"{target} is left out of this run: {reason}")
        self.failed[target] = reason
        self.targets.remove(target)
        self.samples = [s for s in self.samples if s.target != target]

    def run(self) -> dict[str, Any]:
        self.prepare_peers()
        self.redis.ensure_redis()
        try:
            self.start_engine()
            for round_no in range(1, self.config.rounds + 1):
                for target in list(self.targets):
                    try:
                        self.measure(target, round_no)
                    except BenchError as exc:
                        self.drop(target, exc)
        finally:
            self.redis.cleanup_redis()
        results = {s: combine(self.samples, s, tuple(self.targets), self.config.concurrencies)
                   for s in ("best", "median")}  # fmt: skip
        chosen = results[self.config.stat]
        return {
            "stat": self.config.stat,
            "delay_ms": self.config.delay_ms,
            "targets_run": self.targets,
            "concurrencies": list(self.config.concurrencies),
            "results": chosen,
            "results_by_stat": results,
            "targets": verdicts(chosen),
            "peers": self.peers,
            "failed": self.failed,
            "redis": {"url": self.redis.redis_url, "private": self.redis.private_redis},
            "samples": [asdict(s) for s in self.samples],
        }


def combine(
    samples: list[Sample], stat: str, targets: tuple[str, ...], concurrencies: tuple[int, ...]
) -> dict[str, dict[str, dict[str, Any]]]:
    high = max if stat == "best" else statistics.median
    low = min if stat == "best" else statistics.median
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for target in targets:
        results[target] = {}
        for conc in concurrencies:
            cell = [s for s in samples if s.target == target and s.concurrency == conc]
            if not cell:
                continue
            results[target][f"c{conc}"] = {
                "rps": round(high([s.rps for s in cell]), 1),
                "p50_ms": round(low([s.p50_us for s in cell]) / 1000, 3),
                "p99_ms": round(low([s.p99_us for s in cell]) / 1000, 3),
                "cpu_ms_per_request": round(low([s.server_cpu_ms_per_request for s in cell]), 3),
                "requests": sum(s.requests for s in cell),
                "errors": sum(s.errors for s in cell),
                "hits": sum(s.hits for s in cell),
                "rounds": len(cell),
            }
    for target in targets:
        for conc in concurrencies:
            cell = results[target].get(f"c{conc}")
            direct = results.get("direct", {}).get(f"c{conc}")
            if cell is None or direct is None or target == "direct":
                continue
            cell["added_p50_ms"] = round(cell["p50_ms"] - direct["p50_ms"], 3)
            cell["added_p99_ms"] = round(cell["p99_ms"] - direct["p99_ms"], 3)
            cell["throughput_loss"] = round(1 - cell["rps"] / direct["rps"], 4)
    return results


def verdicts(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Issue 8: Strata's miss overhead p50 is below LiteLLM's (at every concurrency measured)."""
    out: dict[str, dict[str, Any]] = {}
    strata, peer = results.get("strata", {}), results.get("litellm", {})
    for key, cell in strata.items():
        other = peer.get(key)
        if other is None or "added_p50_ms" not in cell or "added_p50_ms" not in other:
            continue
        out[f"strata_below_litellm_added_p50_{key}"] = {
            "value": cell["added_p50_ms"],
            "litellm": other["added_p50_ms"],
            "pass": cell["added_p50_ms"] < other["added_p50_ms"],
        }
    return out


def render_table(summary: dict[str, Any]) -> list[str]:
    lines = [
        "| path | conc | RPS | p50 ms | p99 ms | added p50 ms | added p99 ms | throughput loss |"
        " gateway CPU ms / request | requests | errors | hits |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for target in summary["targets_run"]:
        for conc in summary["concurrencies"]:
            cell = summary["results"][target].get(f"c{conc}")
            if cell is None:
                continue
            added = (
                f"{cell['added_p50_ms']:+.3f} | {cell['added_p99_ms']:+.3f} |"
                f" {100 * cell['throughput_loss']:.1f}%"
                if "added_p50_ms" in cell
                else "— | — | —"
            )
            cpu = f"{cell['cpu_ms_per_request']:.2f}" if target != "direct" else "—"
            lines.append(
                f"| {target} | {conc} | {cell['rps']:,.1f} | {cell['p50_ms']:.3f} |"
                f" {cell['p99_ms']:.3f} | {added} | {cpu} | {cell['requests']} |"
                f" {cell['errors']} | {cell.get('hits', 0)} |"
            )
    return lines


def render_verdicts(summary: dict[str, Any]) -> list[str]:
    lines = []
    for name, target in summary["targets"].items():
        conc = name.rsplit("_c", 1)[1]
        lines.append(
            f"- Strata miss overhead p50 below LiteLLM's at c={conc}: {target['value']:+.3f} ms vs"
            f" {target['litellm']:+.3f} ms: {hit_path.verdict(target['pass'])}"
        )
    for peer, info in summary.get("peers", {}).items():
        if "error" in info:
            lines.append(f"- {peer} ({info['spec']}) could not be measured: {info['error']}")
    for target, reason in summary.get("failed", {}).items():
        lines.append(f"- {target} could not be measured in this run: {reason}")
    return lines


def render_markdown(record: dict[str, Any]) -> str:
    cfg, machine = record["config"], record["machine"]
    lines = [
        f"- machine: {machine['nproc']} CPUs ({machine['cpu_model']}), Linux {machine['kernel']},"
        f" Python {machine['python']}, wrk {machine['wrk']}",
        f"- fake engine: {record['delay_ms']:g} ms before every answer (~1 KB); gateways: one"
        f" worker pinned to CPU {cfg['server_cpu']}; wrk -t1, the engine and Redis on CPU"
        f" {cfg['client_cpu']}; {cfg['duration_s']} s per cell, {record['stat']} of"
        f" {cfg['rounds']} interleaved round(s); a new question on every request (`hits`: answers"
        " from a cache all the same, i.e. false hits, summed over the rounds; `errors`: timeouts"
        " and socket errors, tolerated for the peer only)",
        "",
        *render_table(record),
        "",
        *render_verdicts(record),
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--delay-ms", type=float, default=50.0, help="the engine's fixed delay")
    parser.add_argument("--duration", type=int, default=8, help="seconds per measured cell")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--stat", choices=("best", "median"), default="best")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--concurrency", default=",".join(str(c) for c in CONCURRENCIES))
    parser.add_argument(
        "--redis-url", default=os.environ.get("STRATA_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument("--wrk", default=shutil.which("wrk") or "wrk")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    targets = hit_path.parse_list(args.targets, TARGETS, "targets")
    concurrencies = tuple(int(c) for c in args.concurrency.split(",") if c.strip())
    if args.duration <= 0 or args.rounds < 1 or not concurrencies:
        parser.error("--duration > 0, --rounds >= 1 and a concurrency are needed")
    return Config(
        delay_ms=args.delay_ms, duration=args.duration, rounds=args.rounds, stat=args.stat,
        targets=targets, concurrencies=concurrencies, redis_url=args.redis_url,
        server_cpu=args.server_cpu, client_cpu=args.client_cpu, wrk=args.wrk,
        json_out=args.json_out,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    signal.signal(signal.SIGTERM, hit_path._terminate)
    machine = machine_info(config.wrk, config.server_cpu, config.client_cpu)
    workdir = Path(tempfile.mkdtemp(prefix="strata-miss-"))
    procs = Processes(workdir)
    try:
        summary = Bench(config, procs, workdir).run()
    except BenchError as exc:
        print(f"[miss] ERROR: {exc}\n[miss] process logs kept in {workdir}", file=sys.stderr)
        return 1
    finally:
        procs.stop_all()
    shutil.rmtree(workdir, ignore_errors=True)
    record = {
        "machine": machine,
        "config": {
            "duration_s": config.duration,
            "rounds": config.rounds,
            "server_cpu": config.server_cpu,
            "client_cpu": config.client_cpu,
        },
        **summary,
    }
    print(render_markdown(record))
    print(json.dumps(record, separators=(",", ":")))
    if config.json_out is not None:
        config.json_out.parent.mkdir(parents=True, exist_ok=True)
        config.json_out.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
