"""Prefix-aware routing over two real vLLM CPU replicas: prefix affinity against round robin, and
one replica killed under load.

Two vLLM CPU replicas of the default model are launched with the project's own launcher
(`engine.fleet`, as `strata serve --engines 2` does, on its default ports 8000 and 8001 when they
are free): one CPU core each for their compute threads (`VLLM_CPU_OMP_THREADS_BIND`) and a
deliberately small KV cache each (`--num-gpu-blocks-override`: by default 24 blocks of 128 tokens,
vLLM CPU's block size, = 3,072 tokens). A Strata gateway (`strata serve --engine-url A
--engine-url B`, L1 only) routes between them.

The workload: 8 apps, each with a distinct ~500-token system prompt; each request one app's
prompt (drawn at random, the same sequence for every run) with a question no other request asks,
temperature 0, 8 output tokens, closed loop at concurrency 8. Why the KV cache is small: the 8
prompts' cacheable blocks (31 whole 128-token blocks) do not fit in one replica (24 blocks, less
the blocks of the requests it is running), but half of them (16) do, with a block for each request
the load bound lets a replica run and two spare. Round robin sends every prompt to both replicas,
whose caches then hold about two thirds of it and evict each other's prompts; prefix affinity
sends each prompt to one replica, which keeps its half. With an unlimited KV cache both replicas
would hold all 8 prompts and the policies tie (measured: 1.02x with 20,480 tokens each): the
comparison only means something when the prompts in use exceed one replica's cache.

Runs, in one launch of the engines, each from empty prefix caches (vLLM's `/reset_prefix_cache`):
  - `prefix`: routing_policy=prefix at the default load factor c = 1.25;
  - `prefix@1.5`: the same with c = 1.5;
  - `round_robin`: routing_policy=round_robin;
  - `kill` (unless --no-kill): prefix routing at the default ejection window (5 s) and probe
    interval (2 s); one replica is SIGKILLed under load; its supervisor restarts it; counted:
    failed requests in flight at the kill, within the ejection window and after it (the target is
    0), when the gateway ejected it, when it rejoined after the restart, and what it served after.
Per run: aggregate engine prefix-cache hit rate (sum of vllm:prefix_cache_hits_total over sum of
vllm:prefix_cache_queries_total, deltas over the run, both replicas), per-replica hit rate and
requests, goodput (answers per second of wall time), latency, routing decisions, prompts placed
per replica, and the largest in-flight count per replica seen by sampling the gateway's
`strata_engine_replica_in_flight` four times a second, next to the bound ceil(c x concurrency / 2)
that no placement can exceed. Numbers are printed and written to bench/results/prefix_routing.json.

    .venv/bin/python -m bench.prefix_routing           # ~15 min on 2 CPUs, 7 of them vLLM starts
    .venv/bin/python -m bench.prefix_routing --requests 80 --no-kill
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.hit_path import HOST, BenchError, Processes, _terminate, free_port, wait_http
from engine.fleet import EngineFleet, replica_specs
from engine.launcher import EngineLaunchError, EngineSupervisor, LaunchSpec
from engine.model import DEFAULT_SERVED_NAME, ModelError, default_model_dir, prepare_default_model
from engine.routing import Ring, affinity_key
from gateway.tenants import ANONYMOUS

ROOT = Path(__file__).resolve().parents[1]
PATH = "/v1/chat/completions"
RULES = 7  # rules per system prompt: ~500 tokens with the header
CONFIG_KEYS = (
    "requests", "apps", "concurrency", "max_tokens", "seed", "kv_blocks", "block_size",
    "max_model_len", "load_factor", "load_slack", "policies", "engine_cores", "engine_urls",
)  # fmt: skip
HIT_RATIO_MIN = 1.5  # issue 9: prefix affinity's aggregate hit rate over round robin's
VLLM = (
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:request_success_total",
    "vllm:prompt_tokens_total",
)

COMPANIES = [
    ("Harbor Lights Insurance", "insurance", "policies, claims and premiums"),
    ("Quillstone Legal", "law firm", "contracts, filings and deadlines"),
    ("Verdant Grocers", "grocery chain", "produce, deliveries and loyalty points"),
    ("Orbit Telecom", "mobile network", "plans, roaming and coverage"),
    ("Cobalt Cloud", "cloud provider", "instances, storage and billing"),
    ("Maple Grove Clinic", "medical clinic", "appointments, referrals and lab results"),
    ("Tidewater Airlines", "airline", "bookings, baggage and seat changes"),
    ("Ironclad Bikes", "bicycle maker", "frames, repairs and warranties"),
]
TOPICS = [
    "greetings", "identity checks", "refunds", "complaints", "escalation", "privacy",
    "opening hours", "payment methods", "shipping", "cancellations", "discounts", "accessibility",
    "languages", "tone", "formatting", "safety", "legal notices", "follow-ups", "feedback",
    "outages", "account changes", "documents", "emergencies", "closing",
]  # fmt: skip
QUESTIONS = [
    "How do I change the email on my account?", "What does the premium plan include?",
    "Can I get a refund for last month?", "Where can I see my invoices?",
    "How long does delivery usually take?", "Is there a discount for students?",
    "Can I speak to a human agent?", "What are your opening hours on Sunday?",
    "How do I cancel my subscription?", "Why was my card declined?",
    "Do you offer support in Spanish?", "How do I reset my password?",
]  # fmt: skip


def log(message: str) -> None:
    print(f"[routing] {message}", file=sys.stderr, flush=True)


def system_prompt(app: int) -> str:
    """A ~500-token system prompt for app `app`, different from the others from its first word."""
    company, kind, subject = COMPANIES[app]
    rng = random.Random(app)
    lines = [
        f"{company} support assistant. You answer customers of {company}, a {kind}, about "
        f"{subject}. Follow every rule below."
    ]
    for n, topic in enumerate(rng.sample(TOPICS, RULES), 1):
        a, b = rng.sample(QUESTIONS, 2)
        lines.append(
            f"Rule {n} ({topic}): when a {company} customer raises {topic}, stay polite, name "
            f"the {kind} rule that applies to {subject}, and if they ask something like "
            f"'{a.lower()}' or '{b.lower()}', answer in two sentences at most."
        )
    return "\n".join(lines)


def workload(
    requests: int, seed: int, apps: int, start: int = 0
) -> list[tuple[int, dict[str, Any]]]:
    """`requests` (app, body) pairs: a random app each, a question no other request asks."""
    rng = random.Random(seed)
    prompts = [system_prompt(app) for app in range(apps)]
    items = []
    for n in range(start, start + requests):
        app = rng.randrange(apps)
        question = f"{rng.choice(QUESTIONS)} (ticket {n})"
        body = {
            "model": DEFAULT_SERVED_NAME,
            "temperature": 0,
            "max_tokens": 0,  # set by the run
            "messages": [
                {"role": "system", "content": prompts[app]},
                {"role": "user", "content": question},
            ],
        }
        items.append((app, body))
    return items


def parse_vllm(text: str) -> dict[str, float]:
    totals = dict.fromkeys(VLLM, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            with contextlib.suppress(ValueError):
                totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


def parse_gateway(text: str, family: str) -> dict[str, float]:
    """`family`'s samples by their first label value."""
    values = {}
    for line in text.splitlines():
        if line.startswith(family + "{"):
            label = line.split('"', 2)[1]
            values[label] = float(line.rsplit(" ", 1)[1])
    return values


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class Bench:
    def __init__(self, args: argparse.Namespace, procs: Processes) -> None:
        self.args = args
        self.procs = procs
        self.fleet: EngineFleet | None = None
        self.urls: list[str] = []
        self.client = httpx.AsyncClient(timeout=600, trust_env=False)

    async def start_engines(self) -> None:
        args = self.args
        if args.engine_urls:  # already running (e.g. `strata engine serve` with STRATA_ENGINES=2)
            self.urls = args.engine_urls
            log(f"using the replicas at {', '.join(self.urls)}")
            return
        data_dir = Path(args.data_dir)
        try:
            model = str(prepare_default_model(args.engine_python, default_model_dir(data_dir)))
        except ModelError as exc:
            raise BenchError(str(exc)) from exc
        os.environ["VLLM_SERVER_DEV_MODE"] = "1"  # for /reset_prefix_cache
        # Strata's default engine ports (`strata serve --engines 2`) when they are free.
        port = args.engine_port
        while port >= 65535 or not (_port_free(port) and _port_free(port + 1)):
            port = free_port()
        spec = LaunchSpec(
            python=args.engine_python, model=model, served_model_name=DEFAULT_SERVED_NAME,
            device="cpu", port=port, max_model_len=args.max_model_len, cpu_kv_cache_gib=1,
            block_size=args.block_size,
            extra_args=("--num-gpu-blocks-override", str(args.kv_blocks)),
            log_path=data_dir / "logs" / "vllm.log",
        )  # fmt: skip
        specs = replica_specs(spec, 2, cores=args.engine_cores)
        self.fleet = EngineFleet([EngineSupervisor(s, start_timeout=1500) for s in specs])
        self.urls = self.fleet.urls
        started = time.monotonic()
        log(f"starting 2 vLLM replicas at {', '.join(self.urls)} (cores "
            f"{[s.cpu_cores for s in specs]}, {args.kv_blocks} KV blocks each)")  # fmt: skip
        try:
            await self.fleet.start()
        except EngineLaunchError as exc:
            raise BenchError(str(exc)) from exc
        log(f"both replicas healthy after {time.monotonic() - started:.0f} s")

    async def engine_metrics(self) -> list[dict[str, float]]:
        pages = await asyncio.gather(*(self.client.get(url + "/metrics") for url in self.urls))
        return [parse_vllm(page.text) for page in pages]

    async def reset(self) -> bool:
        answers = await asyncio.gather(
            *(self.client.post(url + "/reset_prefix_cache") for url in self.urls),
            return_exceptions=True,
        )
        return all(isinstance(a, httpx.Response) and a.status_code == 200 for a in answers)

    async def prompt_tokens(self) -> list[int]:
        """Tokens of each app's prompt (its system prompt and a question, as the chat template
        renders them): what one request of that app asks its replica to hold."""
        counts = []
        for app in range(self.args.apps):
            body = workload(1, app, self.args.apps)[0][1]
            body["messages"][0]["content"] = system_prompt(app)
            probe = {"model": DEFAULT_SERVED_NAME, "messages": body["messages"]}
            answer = await self.client.post(self.urls[0] + "/tokenize", json=probe)
            answer.raise_for_status()
            counts.append(int(answer.json()["count"]))
        return counts

    def ring_split(self) -> list[int]:
        """How many apps' prompts hash to each replica on the ring alone (the gateway's key for
        the anonymous tenant, default key settings): before the prefix bound evens them out."""
        ring = Ring(self.urls)
        homes = [0] * len(self.urls)
        for app in range(self.args.apps):
            body = workload(1, app, self.args.apps)[0][1]
            body["messages"][0]["content"] = system_prompt(app)
            key = affinity_key("chat", body, block_chars=64, max_blocks=16, salt=ANONYMOUS)
            assert key is not None
            homes[next(ring.walk(key))] += 1
        return homes

    async def warm(self) -> None:
        body = {
            "model": DEFAULT_SERVED_NAME,
            "messages": [{"role": "user", "content": "Say hello."}],
            "temperature": 0,
            "max_tokens": 4,
        }
        for url in self.urls:
            for _ in range(2):
                (await self.client.post(url + PATH, json=body)).raise_for_status()

    def start_gateway(self, name: str, **settings: str) -> tuple[Any, int]:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("STRATA_", "VLLM_"))}
        env.update(
            PYTHONPATH=str(ROOT),
            STRATA_REDIS_ENABLED="false",
            STRATA_SEMANTIC="off",
            STRATA_LOG_LEVEL="warning",
            STRATA_ROUTING_LOAD_FACTOR=str(self.args.load_factor),
            STRATA_ROUTING_LOAD_SLACK=str(self.args.load_slack),
        )
        env.update({f"STRATA_{k.upper()}": v for k, v in settings.items()})
        cmd = [sys.executable, "-m", "gateway", "serve", "--host", HOST, "--port", str(port)]
        for url in self.urls:
            cmd += ["--engine-url", url]
        proc = self.procs.start(name, cmd, env=env, cpu=None)
        wait_http(proc, port, "/readyz", timeout=120)
        return proc, port

    async def sample_in_flight(self, port: int, peaks: dict[str, float]) -> None:
        """The largest in-flight count per replica, from the gateway's metrics, 4 times a second."""
        while True:
            with contextlib.suppress(httpx.HTTPError):
                text = (await self.client.get(f"http://{HOST}:{port}/metrics")).text
                for replica, value in parse_gateway(
                    text, "strata_engine_replica_in_flight"
                ).items():
                    peaks[replica] = max(peaks.get(replica, 0.0), value)
            await asyncio.sleep(0.25)

    async def load(
        self, port: int, items: list[tuple[int, dict[str, Any]]], stop: asyncio.Event | None = None
    ) -> tuple[list[dict[str, Any]], float]:
        """Closed loop at the configured concurrency; with `stop`, cycles until it is set."""
        records: list[dict[str, Any]] = []
        feed = iter(range(10**9 if stop is not None else len(items)))
        url = f"http://{HOST}:{port}{PATH}"

        async def worker() -> None:
            for index in feed:
                if stop is not None and stop.is_set():
                    return
                app, body = items[index % len(items)]
                if stop is not None:  # a question no earlier round asked: always a miss
                    system, question = body["messages"]
                    retold = {"role": "user", "content": f"{question['content']} r{index}"}
                    body = {**body, "messages": [system, retold]}
                sent = time.monotonic()
                error = ""
                try:
                    answer = await self.client.post(
                        url, json={**body, "max_tokens": self.args.max_tokens}
                    )
                    status = answer.status_code
                    if status != 200:
                        error = answer.text[:300]
                except httpx.HTTPError as exc:
                    status, error = 0, repr(exc)
                records.append(
                    {"app": app, "sent": sent, "seconds": time.monotonic() - sent,
                     "status": status, "error": error}
                )  # fmt: skip

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(self.args.concurrency)))
        return records, time.monotonic() - started

    async def run_policy(
        self, policy: str, items: list[tuple[int, dict[str, Any]]]
    ) -> dict[str, Any]:
        reset = await self.reset()
        # "prefix@1.5": the prefix policy with its own load factor c.
        name, _, factor = policy.partition("@")
        settings = {"routing_policy": name}
        if factor:
            settings["routing_load_factor"] = factor
        proc, port = self.start_gateway(policy.replace("@", "-c"), **settings)
        peaks: dict[str, float] = {}
        sampler = asyncio.create_task(self.sample_in_flight(port, peaks))
        try:
            before = await self.engine_metrics()
            log(f"{policy}: {len(items)} requests at concurrency {self.args.concurrency}")
            records, wall = await self.load(port, items)
            await asyncio.sleep(1.5)  # vLLM publishes its counters every second or so
            after = await self.engine_metrics()
            text = (await self.client.get(f"http://{HOST}:{port}/metrics")).text
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
            self.procs.stop(proc)
        decisions = parse_gateway(text, "strata_engine_routing_decisions_total")
        placed = parse_gateway(text, "strata_engine_replica_prefixes")
        replicas: list[dict[str, Any]] = []
        for url, b, a in zip(self.urls, before, after, strict=True):
            delta = {name: a[name] - b[name] for name in VLLM}
            queries, hits = delta[VLLM[0]], delta[VLLM[1]]
            replicas.append({
                "url": url,
                "requests": int(delta["vllm:request_success_total"]),
                "prefix_cache_queries": int(queries),
                "prefix_cache_hits": int(hits),
                "prefix_cache_hit_rate": round(hits / queries, 4) if queries else 0.0,
                "max_in_flight_sampled": int(peaks.get(url, 0)),
                "prefixes_placed": int(placed.get(url, 0)),
            })  # fmt: skip
        queries = sum(r["prefix_cache_queries"] for r in replicas)
        hits = sum(r["prefix_cache_hits"] for r in replicas)
        ok = [r for r in records if r["status"] == 200]
        seconds = [r["seconds"] for r in ok]
        result: dict[str, Any] = {
            "policy": name,
            "load_factor": float(factor or self.args.load_factor),
            "load_slack": self.args.load_slack,
            "requests": len(records),
            "ok": len(ok),
            "failed": len(records) - len(ok),
            "errors": sorted({r["error"] for r in records if r["status"] != 200})[:3],
            "wall_s": round(wall, 2),
            "goodput": round(len(ok) / wall, 3),
            "p50_ms": round(statistics.median(seconds) * 1000, 1) if seconds else 0.0,
            "p99_ms": round(percentile(seconds, 0.99) * 1000, 1) if seconds else 0.0,
            "prefix_cache_hit_rate": round(hits / queries, 4) if queries else 0.0,
            "prefix_cache_hits": hits,
            "prefix_cache_queries": queries,
            "replicas": replicas,
            "decisions": {k: int(v) for k, v in decisions.items() if v},
            "prefix_cache_reset": reset,
        }
        log(f"{policy}: hit rate {100 * result['prefix_cache_hit_rate']:.1f}%, goodput "
            f"{result['goodput']:.2f}/s, per replica "
            f"{[(r['requests'], r['max_in_flight_sampled']) for r in replicas]}")  # fmt: skip
        return result

    async def run_kill(self, items: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
        """Prefix routing at the default ejection window and probes; replica 2 is SIGKILLed under
        load and restarted by its supervisor."""
        assert self.fleet is not None
        window, probe = 5.0, 2.0
        victim_url = self.urls[1]
        victim = self.fleet.supervisors[1]
        proc, port = self.start_gateway(
            "kill", routing_policy="prefix", engine_ejection_window=str(window),
            engine_probe_interval=str(probe),
        )  # fmt: skip
        gateway_metrics = f"http://{HOST}:{port}/metrics"
        stop = asyncio.Event()
        records: list[dict[str, Any]] = []
        clients = asyncio.create_task(self.load(port, items, stop))

        async def healthy() -> float | None:
            text = (await self.client.get(gateway_metrics)).text
            return parse_gateway(text, "strata_engine_replica_healthy").get(victim_url)

        try:
            await asyncio.sleep(self.args.kill_after)
            served_before = (await self.engine_metrics())[1]["vllm:request_success_total"]
            restarts = victim.restarts
            assert victim.pid is not None
            os.killpg(victim.pid, signal.SIGKILL)
            killed = time.monotonic()
            log(f"kill: SIGKILLed the replica at {victim_url} under load")
            ejected = rejoined = restarted = None
            deadline = killed + self.args.restart_timeout
            while time.monotonic() < deadline:
                now = time.monotonic()
                state = await healthy()
                if ejected is None and state == 0.0:
                    ejected = now - killed
                if restarted is None and victim.restarts > restarts:
                    restarted = now - killed
                    log(f"kill: vLLM restarted after {restarted:.0f} s")
                if restarted is not None and state == 1.0:
                    rejoined = now - killed
                    break
                await asyncio.sleep(0.5)
            await asyncio.sleep(10)  # the rejoined replica takes its share again
            served_after = (await self.engine_metrics())[1]["vllm:request_success_total"]
        finally:
            stop.set()
            records, wall = await clients
            self.procs.stop(proc)
        window_end = killed + window
        failed = [r for r in records if r["status"] != 200]
        result = {
            "ejection_window_s": window,
            "probe_interval_s": probe,
            "requests": len(records),
            "failed": len(failed),
            "failed_in_flight_at_kill": sum(r["sent"] < killed for r in failed),
            "failed_within_window": sum(killed <= r["sent"] < window_end for r in failed),
            "failed_after_window": sum(r["sent"] >= window_end for r in failed),
            "requests_after_window": sum(r["sent"] >= window_end for r in records),
            "failed_statuses": sorted({r["status"] for r in failed}),
            "ejected_after_kill_s": None if ejected is None else round(ejected, 2),
            "vllm_restarted_after_kill_s": None if restarted is None else round(restarted, 1),
            "rejoined_after_kill_s": None if rejoined is None else round(rejoined, 1),
            "rejoined_after_restart_s": (
                None if rejoined is None or restarted is None else round(rejoined - restarted, 2)
            ),
            "victim_requests_before_kill": int(served_before),
            "victim_requests_after_rejoin": int(served_after),  # a new process counts from 0
            "wall_s": round(wall, 1),
        }
        log(f"kill: {json.dumps(result)}")
        return result

    async def run(self) -> dict[str, Any]:
        await self.start_engines()
        try:
            await self.warm()
            tokens = await self.prompt_tokens()
            items = workload(self.args.requests, self.args.seed, self.args.apps)
            runs = {}
            for policy in self.args.policies:
                runs[policy] = await self.run_policy(policy, items)
            kill = None
            if self.args.kill and self.fleet is None:
                log("kill: left out (the replicas were not launched by this run)")
            elif self.args.kill:
                more = workload(400, self.args.seed + 1, self.args.apps, start=10**6)
                kill = await self.run_kill(more)
            version = (await self.client.get(self.urls[0] + "/version")).json().get("version")
        finally:
            await self.client.aclose()
            if self.fleet is not None:
                await self.fleet.stop()
        return {
            "prompt_tokens": tokens,
            "ring_split": self.ring_split(),
            "urls": self.urls,
            "runs": runs,
            "kill": kill,
            "vllm": version,
        }


def _port_free(port: int) -> bool:
    import socket  # noqa: PLC0415

    with socket.socket() as sock:
        # As vLLM's server binds: a port a stopped engine left in TIME_WAIT is free to it.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def summarise(record: dict[str, Any]) -> str:
    cfg, runs = record["config"], record["runs"]
    tokens = record["prompt_tokens"]
    block = cfg["block_size"]
    capacity = cfg["kv_blocks"] * block
    # The whole blocks of each app's prompt are what a replica's prefix cache can keep of it.
    blocks = sum(t // block for t in tokens)
    lines = [
        f"- engines: 2 x vLLM {record['vllm']} CPU, {DEFAULT_SERVED_NAME} (float32), one core each"
        f" (compute threads), KV cache {cfg['kv_blocks']} blocks x {block} tokens ="
        f" {capacity:,} tokens per replica",
        f"- workload: {cfg['apps']} apps, prompts of {min(tokens)}-{max(tokens)} tokens with the"
        f" chat template ({sum(tokens):,} tokens, {blocks} whole KV blocks: the working set,"
        f" {blocks / cfg['kv_blocks']:.2f}x one replica's cache); {cfg['requests']} requests,"
        f" distinct questions, max_tokens {cfg['max_tokens']}, concurrency {cfg['concurrency']}",
        f"- replicas {', '.join(record['urls'])}: the ring alone homes {record['ring_split']}"
        " of the apps' prompts on them",
        "",
        "| run | prefix-cache hit rate | per replica (hit rate, requests, max in flight, prompts"
        " placed) |"
        " goodput req/s | p50 ms | p99 ms | failed | decisions |",
        "|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for policy, run in runs.items():
        per = "; ".join(
            f"{100 * r['prefix_cache_hit_rate']:.1f}%, {r['requests']},"
            f" {r['max_in_flight_sampled']}, {r['prefixes_placed']}"
            for r in run["replicas"]
        )
        lines.append(
            f"| {policy} | {100 * run['prefix_cache_hit_rate']:.1f}% | {per} | {run['goodput']:.2f}"
            f" | {run['p50_ms']:,.0f} | {run['p99_ms']:,.0f} | {run['failed']} |"
            f" {run['decisions']} |"
        )
    baseline = runs.get("round_robin")
    ratios = {}
    for name, run in runs.items():
        if run["policy"] != "prefix" or baseline is None:
            continue
        rr = baseline["prefix_cache_hit_rate"]
        ratio = run["prefix_cache_hit_rate"] / rr if rr else math.inf
        peak = max(r["max_in_flight_sampled"] for r in run["replicas"])
        slack = run.get("load_slack", 0)
        bound = math.ceil(run["load_factor"] * cfg["concurrency"] / 2) + slack
        goodput = run["goodput"] / baseline["goodput"] if baseline["goodput"] else math.inf
        ratios[name] = round(ratio, 3)
        lines += [
            "",
            f"- {name} (c = {run['load_factor']:g}, slack {slack}):"
            f" hit rate / round robin's: **{ratio:.2f}x**"
            f" (target >= {HIT_RATIO_MIN:g}x: {'met' if ratio >= HIT_RATIO_MIN else 'NOT met'});"
            f" goodput {goodput:.2f}x; largest in-flight count on one replica (sampled) {peak},"
            f" bound at full concurrency ceil(c x {cfg['concurrency']} / 2) + slack = {bound}:"
            f" {'within' if peak <= bound else 'ABOVE'}",
        ]
    record["hit_rate_ratios"] = ratios
    kill = record.get("kill")
    if kill:
        lines.append(
            f"- kill one replica under load (window {kill['ejection_window_s']:g} s, probes every"
            f" {kill['probe_interval_s']:g} s): {kill['requests']} requests, failed: in flight at"
            f" the kill {kill['failed_in_flight_at_kill']}, within the window"
            f" {kill['failed_within_window']}, after it **{kill['failed_after_window']}** (of"
            f" {kill['requests_after_window']}); ejected after {kill['ejected_after_kill_s']} s;"
            f" vLLM restarted after {kill['vllm_restarted_after_kill_s']} s, back in the gateway"
            f" {kill['rejoined_after_restart_s']} s later; it then served"
            f" {kill['victim_requests_after_rejoin']} requests"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--requests", type=int, default=240)
    parser.add_argument("--apps", type=int, default=8, choices=range(2, len(COMPANIES) + 1))
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=9)
    parser.add_argument("--kv-blocks", type=int, default=24, help="KV blocks per replica")
    parser.add_argument(
        "--block-size", type=int, default=128, help="tokens per KV block (vLLM CPU's default)"
    )
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--load-factor", type=float, default=1.25)
    parser.add_argument(
        "--load-slack", type=int, default=2, help="requests a replica may hold above c x share"
    )
    parser.add_argument(
        "--policies",
        default="prefix,prefix@1.5,round_robin",
        help="runs, in order; prefix@C is the prefix policy with load factor C",
    )
    parser.add_argument("--no-kill", dest="kill", action="store_false")
    parser.add_argument("--kill-after", type=float, default=10.0, help="seconds of load first")
    parser.add_argument("--restart-timeout", type=float, default=900.0)
    parser.add_argument("--engine-cores", default="0,1", help="cores split between the replicas")
    parser.add_argument("--engine-port", type=int, default=8000, help="first replica's port")
    parser.add_argument(
        "--engine-urls",
        default="",
        help="two replicas already running (vLLM with VLLM_SERVER_DEV_MODE=1), instead of"
        " launching them; no kill run then",
    )
    parser.add_argument(
        "--engine-python",
        default=os.environ.get(
            "STRATA_ENGINE_PYTHON", str(ROOT / ".venv-engine" / "bin" / "python")
        ),
    )
    parser.add_argument("--data-dir", default=os.environ.get("STRATA_DATA_DIR", str(ROOT / ".run")))
    parser.add_argument(
        "--json-out", type=Path, default=ROOT / "bench" / "results" / "prefix_routing.json"
    )
    args = parser.parse_args(argv)
    args.policies = [p for p in args.policies.split(",") if p]
    args.engine_cores = [int(c) for c in args.engine_cores.split(",")]
    args.engine_urls = [u.rstrip("/") for u in args.engine_urls.split(",") if u]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    workdir = Path(tempfile.mkdtemp(prefix="strata-routing-"))
    procs = Processes(workdir)
    started = time.monotonic()
    try:
        summary = asyncio.run(Bench(args, procs).run())
    except BenchError as exc:
        print(f"[routing] ERROR: {exc}\n[routing] logs kept in {workdir}", file=sys.stderr)
        return 1
    finally:
        procs.stop_all()
    record = {
        "config": {key: getattr(args, key) for key in CONFIG_KEYS},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "loadavg_at_end": os.getloadavg(),
        "elapsed_s": round(time.monotonic() - started, 1),
        **summary,
    }
    print(summarise(record))
    text = json.dumps(record, indent=1)
    print(text)
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
