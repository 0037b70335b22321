"""Hit-path benchmark: bare Starlette vs Strata's L1, L2 and L3 hits vs LiteLLM's cache hits, on
one machine, in one run.

Serves the same ~1 KB `chat.completion` from
  (a) `bare`:    a bare Starlette app (bench/bare_app.py), the physical limit for a Python ASGI
                 server,
  (b) `l1`:      the Strata gateway answering from its in-process L1 cache,
  (c) `l2`:      the Strata gateway with L1 disabled (STRATA_L1_MAX_ENTRIES=0), answering from
                 Redis,
  (d) `l3`:      the Strata gateway with the semantic cache on (STRATA_SEMANTIC=on), asked a
                 paraphrase of the stored question ("What's the capital of France?" for "What is
                 the capital of France?"): L1 and L2 miss, L3 embeds the question, searches,
                 verifies and serves the stored answer (an L3 hit is not promoted, so every request
                 takes that path),
  (e) `litellm`: LiteLLM's proxy (pinned version, its own virtualenv, bench/peers/litellm.py) with
                 its Redis cache, answering cache hits (`x-litellm-cache-key` on every response),
each a single worker (uvicorn; LiteLLM's own `--num_workers 1`) pinned to one CPU while `wrk`
(one thread) runs pinned to another, and prints requests/s and p50/p99 latency at concurrency 1, 16
and 64, with the RPS ratio to `bare` at the same concurrency.

How a run goes:
  1. Redis: the URL given (default redis://127.0.0.1:6379/0) if it answers PING, else (or always,
     with --private-redis) a private `redis-server` on a free port, pinned to the client CPU so
     it never competes with the server for its CPU. Keys use a per-run prefix
     (`bench-<pid>-<time>`), deleted at the end.
  2. The fake engine (`python -m engine.fake --answer-bytes 1000`), pinned to the client CPU.
  3. Priming: a gateway with L1 disabled (and L3 on when `l3` is measured) takes one miss (stored
     in Redis and L3), then serves the same request as an L2 hit (and the paraphrase as an L3
     hit); the hit's body bytes are what the bare app serves, so every server sends identical
     payloads.
  4. For each round, for each target: start the server pinned to the server CPU, wait for it,
     send a few requests and check they are hits from the expected layer (abort otherwise), run
     an unrecorded wrk warm-up, then the measured runs at each concurrency, then stop it. Rounds
     interleave the servers so that machine noise hits all of them alike; the table shows the best
     of the rounds (--stat median for medians; the JSON has both and every sample).
  5. Every wrk response is checked by bench/post.lua (2xx; for l1/l2/l3 `X-Strata-Cache: hit`
     with the right `X-Strata-Layer`; for litellm its cache-hit header); any non-2xx, wrong layer
     or socket error fails the run loudly (for the peer, timeouts and errors under load are
     recorded and shown instead). Misses fail it past 2% of a cell (an overloaded gateway answers
     a request from the engine when Redis replies later than STRATA_REDIS_TIMEOUT, by design);
     below that they are counted and shown. The fake engine's call count may grow by no more than
     the misses counted while a cache target is measured: every other answer came from a cache.
Every process started is killed at the end (process groups), even on errors or Ctrl-C.

On a shared machine other processes take CPU time from the pinned server; the table therefore also
shows the server's CPU share during each cell and its requests per CPU-second, a cost measure that
such noise leaves alone (at c=16, RPS / bare and req/CPU-s / bare should agree when the run is
clean).

Run (from the repository root; needs wrk, taskset and 2+ CPUs):
    .venv/bin/python -m bench.hit_path                  # 10 s per cell, 3 rounds
    .venv/bin/python -m bench.hit_path --duration 5 --rounds 1 --targets bare,l1,l2
    .venv/bin/python -m bench.hit_path --private-redis --check   # exit 1 when a target is missed
Output: a markdown table (also written to --out), target verdicts, and a final line of JSON with
every number (including each round's raw samples and per-CPU busy/steal time; also written to
--json-out).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.metadata
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.peers import litellm

ROOT = Path(__file__).resolve().parent.parent
LUA_SCRIPT = Path(__file__).resolve().parent / "post.lua"
HOST = "127.0.0.1"
PATH = "/v1/chat/completions"
MODEL = "strata-fake"
REQUEST = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "temperature": 0,
    "max_tokens": 300,
}
REQUEST_BODY = json.dumps(REQUEST, separators=(",", ":"))
# A paraphrase the verifier accepts for REQUEST's question: served from L3 with REQUEST's answer.
PARAPHRASE = {
    **REQUEST,
    "messages": [{"role": "user", "content": "What's the capital of France?"}],
}
PARAPHRASE_BODY = json.dumps(PARAPHRASE, separators=(",", ":"))
CONCURRENCIES = (1, 16, 64)
TARGETS = ("bare", "l1", "l2", "l3", "litellm")
CACHE_TARGETS = ("l1", "l2", "l3", "litellm")
PEERS = ("litellm",)
UVICORN_FLAGS = ["--loop", "uvloop", "--http", "httptools", "--no-access-log"]
UVICORN_FLAGS += ["--log-level", "warning"]
# The acceptance targets.
L1_RPS_RATIO_MIN = 0.40  # L1 hit RPS / bare RPS at c=16
L2_RPS_RATIO_MIN = 0.25  # L2 hit RPS / bare RPS at c=16
L1_P50_MAX_MS = 0.25  # L1 hit p50 at c=1
L1_OVER_LITELLM_MIN = 50.0  # issue 8: L1 hit RPS / LiteLLM cache-hit RPS at c=16
# Misses tolerated in a hit-path cell (shown in the table): an overloaded gateway may answer a few
# requests from the engine when Redis replies later than STRATA_REDIS_TIMEOUT (fail-open).
MAX_MISS_SHARE = 0.02


def body_for(target: str) -> str:
    return PARAPHRASE_BODY if target == "l3" else REQUEST_BODY


class BenchError(RuntimeError):
    """A benchmark run that cannot produce trustworthy numbers."""


# --------------------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


class Processes:
    """Starts processes in their own process groups and kills every one of them on `stop_all`."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[Proc] = []

    def start(
        self, name: str, cmd: list[str], *, env: dict[str, str] | None = None, cpu: int | None
    ) -> Proc:
        if cpu is not None:
            cmd = ["taskset", "-c", str(cpu), *cmd]
        log = self.logdir / f"{name}.log"
        with log.open("ab") as out:
            out.write(f"$ {shlex.join(cmd)}\n".encode())
            out.flush()
            popen = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, so we can kill its children too
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, timeout: float = 5.0) -> None:
        if proc in self.procs:
            self.procs.remove(proc)
        pgid = proc.popen.pid  # start_new_session: the group id is the leader's pid
        if proc.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout)
        # Whatever is left in the group (the leader or any child it spawned) gets SIGKILL.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            with contextlib.suppress(Exception):
                self.stop(proc)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_http(proc: Proc, port: int, path: str, timeout: float = 60.0) -> None:
    """Wait until GET `path` answers 200, failing early if the process dies."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise BenchError(
                f"{proc.name} exited with status {proc.popen.returncode} before it was ready;"
                f" log {proc.log}:\n{proc.tail()}"
            )
        conn = http.client.HTTPConnection(HOST, port, timeout=2)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            if resp.status == 200:
                return
            last = f"status {resp.status}"
        except OSError as exc:
            last = repr(exc)
        finally:
            conn.close()
        time.sleep(0.1)
    raise BenchError(
        f"{proc.name} not ready on port {port} after {timeout:.0f} s ({last}); log {proc.log}:\n"
        f"{proc.tail()}"
    )


@dataclass
class Reply:
    status: int
    cache: str | None
    layer: str | None
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        return (
            f"status {self.status}, X-Strata-Cache={self.cache!r}, X-Strata-Layer={self.layer!r},"
            f" body {self.body[:200]!r}"
        )


def post(conn: http.client.HTTPConnection, body: str = REQUEST_BODY) -> Reply:
    conn.request("POST", PATH, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    return Reply(
        resp.status,
        resp.getheader("X-Strata-Cache"),
        resp.getheader("X-Strata-Layer"),
        data,
        {name.lower(): value for name, value in resp.getheaders()},
    )


def answer_text(body: bytes) -> str:
    """The assistant's text in a chat.completion body ("" when it has none)."""
    try:
        return str(json.loads(body)["choices"][0]["message"]["content"])
    except (ValueError, KeyError, IndexError, TypeError):
        return ""


def engine_calls(engine_url: str) -> int:
    """Chat completions the fake engine has answered so far (its /fake/stats)."""
    host, port = engine_url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", "/fake/stats")
        stats = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    return int(stats["calls"].get(PATH, 0))


# --------------------------------------------------------------------------- machine


def read_cpu_times() -> dict[str, list[int]]:
    """Per-CPU jiffies from /proc/stat (user nice system idle iowait irq softirq steal ...)."""
    times: dict[str, list[int]] = {}
    with contextlib.suppress(OSError), open("/proc/stat") as fh:
        for line in fh:
            if line.startswith("cpu") and line[3:4].isdigit():
                name, *values = line.split()
                times[name] = [int(v) for v in values]
    return times


def cpu_usage(
    before: dict[str, list[int]], after: dict[str, list[int]], cpu: int
) -> dict[str, float]:
    """Busy and steal percentages of one CPU between two `read_cpu_times` snapshots."""
    name = f"cpu{cpu}"
    if name not in before or name not in after:
        return {}
    delta = [b - a for a, b in zip(before[name], after[name], strict=False)]
    total = sum(delta[:8]) or 1  # guest time is already counted in user
    idle = delta[3] + delta[4]
    steal = delta[7] if len(delta) > 7 else 0
    return {
        "busy_pct": round(100 * (total - idle - steal) / total, 1),
        "steal_pct": round(100 * steal / total, 1),
    }


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds used so far by the live processes of process group `pgid`."""
    ticks = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        if int(fields[2]) == pgid:  # field 5, pgrp
            ticks += int(fields[11]) + int(fields[12])  # fields 14, 15: utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def wrk_version(wrk: str) -> str:
    out = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False)
    match = re.search(r"wrk\s+(\S+)", out.stdout + out.stderr)
    return match.group(1) if match else "unknown"


def machine_info(wrk: str, server_cpu: int, client_cpu: int) -> dict[str, Any]:
    try:
        load = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        load = []
    return {
        "nproc": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "uvicorn": version("uvicorn"),
        "starlette": version("starlette"),
        "uvloop": version("uvloop"),
        "httptools": version("httptools"),
        "wrk": wrk_version(wrk),
        "server_cpu": server_cpu,
        "client_cpu": client_cpu,
        "loadavg_at_start": load,
    }


# --------------------------------------------------------------------------- wrk


@dataclass
class Sample:
    target: str
    concurrency: int
    round: int
    rps: float
    p50_us: int
    p90_us: int
    p99_us: int
    max_us: int
    requests: int
    bytes_per_response: float
    # CPU seconds the server's process group used during the run, its share of the wall time, and
    # requests per server CPU-second: a noise-resistant cost measure (other tenants of the machine
    # take CPU time away from the server, but do not change what one request costs it).
    server_cpu_s: float
    server_cpu_share: float
    rps_per_cpu: float
    server_cpu: dict[str, float] = field(default_factory=dict)
    client_cpu: dict[str, float] = field(default_factory=dict)
    errors: int = 0  # timeouts, socket errors, non-2xx (tolerated for peers only)
    misses: int = 0  # answers that were not cache hits (tolerated up to MAX_MISS_SHARE)


@dataclass(frozen=True)
class Expect:
    """What bench/post.lua checks on every response (see its header)."""

    layer: str | None = None  # X-Strata-Cache: hit with this X-Strata-Layer
    cache: str | None = None  # this X-Strata-Cache value
    header: str | None = None  # a header every response carries (a peer's cache hit)
    forbid_header: str | None = None  # a header no response carries (a peer's cache miss)
    unique: bool = False  # "@@N@@" in the body becomes a new number per request

    def environment(self) -> dict[str, str]:
        return {
            "STRATA_BENCH_EXPECT_LAYER": self.layer or "",
            "STRATA_BENCH_EXPECT_CACHE": self.cache or "",
            "STRATA_BENCH_EXPECT_HEADER": self.header or "",
            "STRATA_BENCH_FORBID_HEADER": self.forbid_header or "",
            "STRATA_BENCH_UNIQUE": "1" if self.unique else "",
        }


HARD_PROBLEMS = ("not_hit", "wrong_layer")
LOAD_ERRORS = (
    "non_2xx", "connect_errors", "read_errors", "write_errors", "status_errors", "timeouts",
)  # fmt: skip


def run_wrk(
    wrk: str,
    port: int,
    *,
    connections: int,
    duration: int,
    client_cpu: int,
    label: str,
    body: str = REQUEST_BODY,
    expect: Expect | None = None,
    tolerate_errors: bool = False,
    timeout_s: int = 5,
    max_miss_share: float = 0.0,
) -> tuple[dict[str, Any], str]:
    """One wrk run through bench/post.lua; its STRATA_WRK stats and wrk's whole output.

    A wrong layer fails the run, and so do misses beyond `max_miss_share` of the requests (a
    gateway under overload may answer a few from the engine: a Redis reply later than its timeout
    is a miss by design; they are in the stats as `not_hit`); so do errors and timeouts unless
    `tolerate_errors` (a peer under a load it cannot carry), in which case they are in the stats
    as `errors`."""
    cmd = [
        "taskset", "-c", str(client_cpu), wrk,
        "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", f"{timeout_s}s",
        "-s", str(LUA_SCRIPT), f"http://{HOST}:{port}{PATH}",
    ]  # fmt: skip
    env = {**os.environ, "STRATA_BENCH_BODY": body, **(expect or Expect()).environment()}
    try:
        out = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=duration + 60, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{label}: wrk did not finish in time") from exc
    text = out.stdout + out.stderr
    match = re.search(r"^STRATA_WRK (\{.*\})$", text, re.MULTILINE)
    if out.returncode != 0 or match is None:
        raise BenchError(
            f"{label}: wrk failed (exit {out.returncode}):\n$ {shlex.join(cmd)}\n{text}"
        )
    stats: dict[str, Any] = json.loads(match.group(1))
    stats["errors"] = sum(int(stats.get(name) or 0) for name in LOAD_ERRORS)
    checked = HARD_PROBLEMS if tolerate_errors else HARD_PROBLEMS + LOAD_ERRORS
    allowed = {"not_hit": int(max_miss_share * stats.get("requests", 0))}
    problems = [
        f"{name}={stats[name]}" for name in checked if stats.get(name, 0) > allowed.get(name, 0)
    ]
    # wrk's own summary lines, as a second check on the script's counters.
    if not tolerate_errors and "Non-2xx or 3xx responses" in text:
        problems.append("wrk reported non-2xx/3xx responses")
    if not tolerate_errors and "Socket errors" in text:
        problems.append("wrk reported socket errors")
    if stats.get("requests", 0) - stats["errors"] <= 0:
        problems.append("no requests completed")
    if problems:
        example = f" (e.g. {stats['example_bad']})" if stats.get("example_bad") else ""
        raise BenchError(f"{label}: bad responses: {', '.join(problems)}{example}\n{text}")
    return stats, text


# --------------------------------------------------------------------------- the run


@dataclass
class Config:
    duration: int
    warmup: int
    rounds: int
    stat: str
    redis_url: str
    server_cpu: int
    client_cpu: int
    gateway_cmd: list[str]
    wrk: str
    out: Path | None
    check: bool
    private_redis: bool
    targets: tuple[str, ...] = TARGETS
    concurrencies: tuple[int, ...] = CONCURRENCIES
    json_out: Path | None = None


class Bench:
    def __init__(self, config: Config, procs: Processes, workdir: Path) -> None:
        self.config = config
        self.procs = procs
        self.workdir = workdir
        self.python = sys.executable
        self.prefix = f"bench-{os.getpid()}-{int(time.time())}"
        self.redis_url = config.redis_url
        self.private_redis = False
        self.engine_url = ""
        self.body_file = workdir / "answer.json"
        self.answer = b""
        self.samples: list[Sample] = []
        self.targets = list(config.targets)
        self.peers: dict[str, dict[str, str]] = {}  # peer -> {"version"} or {"error"}
        self.failed: dict[str, str] = {}  # target -> why it could not be measured

    def log(self, message: str) -> None:
        print(f"[bench] {message}", file=sys.stderr, flush=True)

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env.update(extra)
        return env

    # --- infrastructure ---

    def ensure_redis(self) -> None:
        import redis  # noqa: PLC0415 - only needed here; a gateway dependency

        if self.config.private_redis:
            self.start_private_redis()
            return
        try:
            client = redis.Redis.from_url(
                self.redis_url, socket_timeout=1, socket_connect_timeout=1
            )
            client.ping()
            client.close()
            self.log(f"using Redis at {self.redis_url}")
            return
        except (redis.RedisError, OSError) as exc:
            self.log(f"Redis at {self.redis_url} is unreachable ({exc}); starting a private one")
        self.start_private_redis()

    def start_private_redis(self) -> None:
        """A throwaway redis-server on a free port, pinned to the client CPU (with wrk)."""
        import redis  # noqa: PLC0415

        server = shutil.which("redis-server")
        if server is None:
            raise BenchError("no Redis reachable and no redis-server binary to start one")
        port = free_port()
        proc = self.procs.start(
            "redis",
            [server, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"],
            cpu=self.config.client_cpu,
        )
        self.redis_url = f"redis://{HOST}:{port}/0"
        self.private_redis = True
        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis.from_url(self.redis_url, socket_timeout=1).ping()
                break
            except (redis.RedisError, OSError) as exc:
                if proc.popen.poll() is not None or time.monotonic() > deadline:
                    raise BenchError(f"private redis-server did not start:\n{proc.tail()}") from exc
                time.sleep(0.1)
        self.log(f"started a private Redis at {self.redis_url}")

    def cleanup_redis(self) -> None:
        if self.private_redis:
            return  # killed with the other processes
        import redis  # noqa: PLC0415

        with contextlib.suppress(redis.RedisError, OSError):
            client = redis.Redis.from_url(self.redis_url, socket_timeout=2)
            keys = list(client.scan_iter(match=f"{self.prefix}:*", count=1000))
            if keys:
                client.unlink(*keys)
            client.close()
            self.log(f"deleted {len(keys)} benchmark key(s) with prefix {self.prefix}: from Redis")

    def start_engine(self) -> None:
        port = free_port()
        cmd = [
            self.python,
            "-m",
            "engine.fake",
            "--host",
            HOST,
            "--port",
            str(port),
            "--answer-bytes",
            "1000",
            "--model",
            MODEL,
        ]
        proc = self.procs.start("engine", cmd, env=self.env(), cpu=self.config.client_cpu)
        wait_http(proc, port, "/health")
        self.engine_url = f"http://{HOST}:{port}"
        self.log(f"fake engine ready at {self.engine_url}")

    def prepare_peers(self) -> None:
        """Install the peers measured (once); a peer that cannot be installed is left out of the
        run, with what failed recorded for the report."""
        if "litellm" not in self.targets:
            return
        try:
            version_ = litellm.ensure_installed(self.log)
        except (litellm.PeerUnavailable, OSError, subprocess.TimeoutExpired) as exc:
            self.log(f"LiteLLM is left out: {exc}")
            self.peers["litellm"] = {"spec": litellm.spec(), "error": str(exc)}
            self.targets.remove("litellm")
            return
        self.peers["litellm"] = {"spec": litellm.spec(), "version": version_}
        self.log(f"LiteLLM {version_} ready in {litellm.VENV}")

    # --- servers ---

    def start_server(
        self, target: str, name: str | None = None, *, semantic: bool = False
    ) -> tuple[Proc, int]:
        port = free_port()
        name = name or target
        ready, timeout = "/healthz", 60.0
        if target == "bare":
            cmd = [
                self.python,
                "-m",
                "uvicorn",
                "bench.bare_app:app",
                "--host",
                HOST,
                "--port",
                str(port),
                *UVICORN_FLAGS,
            ]
            env = self.env(STRATA_BENCH_BODY_FILE=str(self.body_file))
        elif target == "litellm":
            config = litellm.write_config(
                self.workdir / "litellm.yaml",
                model=MODEL,
                engine_url=self.engine_url,
                redis_url=self.redis_url,
                namespace=f"{self.prefix}:litellm",
            )
            cmd = litellm.command(config, host=HOST, port=port)
            env = litellm.environment(dict(os.environ))
            ready, timeout = "/health/liveliness", 180.0
        else:
            cmd = [
                *self.config.gateway_cmd,
                "--engine-url",
                self.engine_url,
                "--host",
                HOST,
                "--port",
                str(port),
            ]
            extra = {
                "STRATA_REDIS_URL": self.redis_url,
                "STRATA_REDIS_KEY_PREFIX": self.prefix,
                "STRATA_LOG_LEVEL": "warning",
                "STRATA_SEMANTIC": "on" if semantic or target == "l3" else "off",
                "STRATA_SEMANTIC_EMBED_THREADS": "1",  # it has one CPU
            }
            if target == "l2":
                extra["STRATA_L1_MAX_ENTRIES"] = "0"
            env = self.env(**extra)
            if extra["STRATA_SEMANTIC"] == "on":
                timeout = 180.0  # loads the embedding model
        proc = self.procs.start(name, cmd, env=env, cpu=self.config.server_cpu)
        wait_http(proc, port, ready, timeout=timeout)
        affinity = os.sched_getaffinity(proc.popen.pid)
        if affinity != {self.config.server_cpu}:
            raise BenchError(f"{name} is not pinned to CPU {self.config.server_cpu}: {affinity}")
        return proc, port

    def poll_hit(
        self, conn: http.client.HTTPConnection, body: str, layer: str, proc: Proc
    ) -> Reply:
        deadline = time.monotonic() + 10  # the gateway may store in the background
        reply = post(conn, body)
        while time.monotonic() < deadline:
            if reply.status == 200 and reply.cache == "hit" and reply.layer == layer:
                return reply
            time.sleep(0.05)
            reply = post(conn, body)
        raise BenchError(
            f"the gateway never served the primed request as an {layer} hit; last reply: "
            f"{reply.describe()}\nlog:\n{proc.tail()}"
        )

    def prime(self) -> None:
        """Store the answer in Redis (and L3) through a gateway; keep the hit's bytes for `bare`."""
        semantic = "l3" in self.targets
        try:
            proc, port = self.start_server("l2", name="prime", semantic=semantic)
        except BenchError as exc:
            if not semantic:
                raise
            self.drop("l3", exc)  # the semantic cache does not start: measure the rest
            semantic = False
            proc, port = self.start_server("l2", name="prime")
        try:
            conn = http.client.HTTPConnection(HOST, port, timeout=30)
            first = post(conn)
            if first.status != 200:
                raise BenchError(f"priming request failed: {first.describe()}")
            reply = self.poll_hit(conn, REQUEST_BODY, "l2", proc)
            if semantic:
                near = self.poll_hit(conn, PARAPHRASE_BODY, "l3", proc)
                if answer_text(near.body) != answer_text(reply.body):
                    raise BenchError("the L3 hit does not carry the stored answer")
            conn.close()
        finally:
            self.procs.stop(proc)
        json.loads(reply.body)  # it must be a JSON document
        self.answer = reply.body
        self.body_file.write_bytes(reply.body)
        self.log(f"primed: the cached answer is {len(reply.body)} bytes")

    def verify(self, target: str, port: int) -> None:
        """A few sequential requests; the last ones must be hits from the expected layer."""
        conn = http.client.HTTPConnection(HOST, port, timeout=30)
        try:
            replies = []
            for _ in range(20):
                replies.append(post(conn, body_for(target)))
                if target == "litellm":
                    time.sleep(0.05)  # its first answer is written to Redis in the background
        finally:
            conn.close()
        for reply in replies[-10:]:
            ok = reply.status == 200
            if target == "litellm":
                # The engine's words depend on the exact body it got, and LiteLLM sends another
                # body than Strata: its hits must repeat its own first answer.
                ok = ok and litellm.CACHE_HIT_HEADER in reply.headers
                ok = ok and answer_text(reply.body) == answer_text(replies[0].body) != ""
                want = f"200 with {litellm.CACHE_HIT_HEADER} repeating its first answer"
            elif target != "bare":
                ok = ok and reply.cache == "hit" and reply.layer == target
                want = f"200 with X-Strata-Cache=hit, layer {target}"
            else:
                want = "200"
            if not ok:
                raise BenchError(f"{target}: warm-up request is not a {want}: {reply.describe()}")
        body = replies[-1].body
        if len(body) != len(self.answer):
            self.log(
                f"note: {target} answers {len(body)} body bytes, the primed answer has "
                f"{len(self.answer)}"
            )

    @staticmethod
    def expect_for(target: str) -> Expect:
        if target == "litellm":
            return Expect(header=litellm.CACHE_HIT_HEADER)
        if target in ("l1", "l2", "l3"):
            return Expect(layer=target)
        return Expect()

    def measure_target(self, target: str, round_no: int) -> None:
        cfg = self.config
        proc, port = self.start_server(target)
        peer = target in PEERS
        try:
            self.verify(target, port)
            expect, body = self.expect_for(target), body_for(target)
            calls_before = engine_calls(self.engine_url)
            misses = 0
            if cfg.warmup > 0:
                # Not past c=16: a peer that falls behind at c=64 would still be working off that
                # backlog during the c=1 cell.
                warm, _ = run_wrk(
                    cfg.wrk,
                    port,
                    connections=min(max(cfg.concurrencies), 16),
                    duration=cfg.warmup,
                    client_cpu=cfg.client_cpu,
                    label=f"{target} warm-up",
                    body=body,
                    expect=expect,
                    tolerate_errors=peer,
                    max_miss_share=MAX_MISS_SHARE,
                )
                misses += warm.get("not_hit", 0)
            for conc in cfg.concurrencies:
                label = f"round {round_no} {target} c={conc}"
                before = read_cpu_times()
                cpu_before = group_cpu_seconds(proc.popen.pid)
                stats, _ = run_wrk(
                    cfg.wrk,
                    port,
                    connections=conc,
                    duration=cfg.duration,
                    client_cpu=cfg.client_cpu,
                    label=label,
                    body=body,
                    expect=expect,
                    tolerate_errors=peer,
                    max_miss_share=MAX_MISS_SHARE,
                )
                misses += stats.get("not_hit", 0)
                cpu_used = group_cpu_seconds(proc.popen.pid) - cpu_before
                after = read_cpu_times()
                if proc.popen.poll() is not None:
                    raise BenchError(f"{target} died during the run:\n{proc.tail()}")
                sample = Sample(
                    target=target,
                    concurrency=conc,
                    round=round_no,
                    rps=round(stats["rps"], 1),
                    p50_us=stats["p50_us"],
                    p90_us=stats["p90_us"],
                    p99_us=stats["p99_us"],
                    max_us=stats["max_us"],
                    requests=stats["requests"],
                    bytes_per_response=round(stats["bytes"] / stats["requests"], 1),
                    server_cpu_s=round(cpu_used, 2),
                    server_cpu_share=round(cpu_used / (stats["duration_us"] / 1e6), 3),
                    rps_per_cpu=round(stats["requests"] / cpu_used, 1) if cpu_used > 0 else 0.0,
                    server_cpu=cpu_usage(before, after, cfg.server_cpu),
                    client_cpu=cpu_usage(before, after, cfg.client_cpu),
                    errors=stats["errors"],
                    misses=stats.get("not_hit", 0),
                )
                self.samples.append(sample)
                self.log(
                    f"{label}: {sample.rps:.0f} req/s, p50 {sample.p50_us} us, p99 "
                    f"{sample.p99_us} us; server used {100 * sample.server_cpu_share:.0f}% of a"
                    f" CPU ({sample.rps_per_cpu:.0f} req per CPU-s); CPU {cfg.server_cpu} busy"
                    f" {sample.server_cpu.get('busy_pct')}%,"
                    f" steal {sample.server_cpu.get('steal_pct')}%"
                    + (f"; {sample.errors} errors" if sample.errors else "")
                    + (f"; {sample.misses} not hits" if sample.misses else "")
                )
            if target in CACHE_TARGETS:
                moved = engine_calls(self.engine_url) - calls_before
                if moved > misses:
                    raise BenchError(
                        f"{target}: the engine answered {moved} request(s) during the run but"
                        f" only {misses} were reported as misses"
                    )
        finally:
            self.procs.stop(proc)

    def run(self) -> dict[str, Any]:
        self.prepare_peers()
        self.ensure_redis()
        try:
            self.start_engine()
            self.prime()
            for round_no in range(1, self.config.rounds + 1):
                for target in list(self.targets):
                    try:
                        self.measure_target(target, round_no)
                    except BenchError as exc:
                        self.drop(target, exc)
        finally:
            self.cleanup_redis()
        return self.summarise()

    def drop(self, target: str, exc: BaseException) -> None:
        """Leave a target out of the run (the others go on), keeping why for the report."""
        lines = [line for line in str(exc).splitlines() if line.strip()]
        reason = " / ".join(lines[:2] + (lines[-1:] if len(lines) > 2 else []))[:600]
        self.log(f"{target} is left out of this run: {reason}")
        self.failed[target] = reason
        if target in self.targets:
            self.targets.remove(target)
        self.samples = [s for s in self.samples if s.target != target]

    # --- results ---

    def summarise(self) -> dict[str, Any]:
        targets_run, concs = tuple(self.targets), self.config.concurrencies
        results = {
            stat: combine(self.samples, stat, targets_run, concs) for stat in ("best", "median")
        }
        chosen = results[self.config.stat]
        return {
            "stat": self.config.stat,
            "targets_run": list(targets_run),
            "concurrencies": list(concs),
            "results": chosen,
            "results_by_stat": results,
            "targets": verdicts(chosen),
            "answer_bytes": len(self.answer),
            "redis": {"url": self.redis_url, "private": self.private_redis},
            "peers": self.peers,
            "failed": self.failed,
            "samples": [asdict(s) for s in self.samples],
        }


def verdicts(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """The issues' targets that the targets run can decide."""
    out: dict[str, dict[str, Any]] = {}

    def cell(target: str, conc: int) -> dict[str, Any] | None:
        return results.get(target, {}).get(f"c{conc}")

    if (l1 := cell("l1", 16)) and cell("bare", 16):
        ratio = l1["rps_ratio_to_bare"]
        out["l1_rps_ratio_c16"] = {
            "value": ratio, "min": L1_RPS_RATIO_MIN, "pass": ratio >= L1_RPS_RATIO_MIN,
        }  # fmt: skip
    if (l2 := cell("l2", 16)) and cell("bare", 16):
        ratio = l2["rps_ratio_to_bare"]
        out["l2_rps_ratio_c16"] = {
            "value": ratio, "min": L2_RPS_RATIO_MIN, "pass": ratio >= L2_RPS_RATIO_MIN,
        }  # fmt: skip
    if l1_c1 := cell("l1", 1):
        p50 = l1_c1["p50_ms"]
        out["l1_p50_ms_c1"] = {"value": p50, "max": L1_P50_MAX_MS, "pass": p50 < L1_P50_MAX_MS}
    if (l1 := cell("l1", 16)) and (peer := cell("litellm", 16)):
        ratio = round(l1["rps"] / peer["rps"], 1) if peer["rps"] else float("inf")
        out["l1_over_litellm_rps_c16"] = {
            "value": ratio, "min": L1_OVER_LITELLM_MIN, "pass": ratio >= L1_OVER_LITELLM_MIN,
        }  # fmt: skip
    return out


def combine(
    samples: list[Sample],
    stat: str,
    targets: tuple[str, ...] = TARGETS,
    concurrencies: tuple[int, ...] = CONCURRENCIES,
) -> dict[str, dict[str, dict[str, Any]]]:
    """A cell per (target, concurrency) over the rounds: best (max rate, min latency) or median."""
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
                "rps_per_cpu": round(high([s.rps_per_cpu for s in cell]), 1),
                "server_cpu_share": round(high([s.server_cpu_share for s in cell]), 3),
                "bytes_per_response": cell[-1].bytes_per_response,
                "errors": sum(s.errors for s in cell),
                "misses": sum(s.misses for s in cell),
                "requests": sum(s.requests for s in cell),
                "rounds": len(cell),
            }
    for target in targets:
        for conc in concurrencies:
            cell, bare = results[target].get(f"c{conc}"), results.get("bare", {}).get(f"c{conc}")
            if cell is None or bare is None:
                continue
            cell["rps_ratio_to_bare"] = round(cell["rps"] / bare["rps"], 3)
            cell["p50_ratio_to_bare"] = round(cell["p50_ms"] / bare["p50_ms"], 3)
            cell["rps_per_cpu_ratio_to_bare"] = (
                round(cell["rps_per_cpu"] / bare["rps_per_cpu"], 3) if bare["rps_per_cpu"] else 0.0
            )
    return results


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def render_table(summary: dict[str, Any]) -> list[str]:
    results = summary["results"]
    lines = [
        "| path | conc | RPS | p50 ms | p99 ms | RPS / bare | CPU share | req/CPU-s |"
        " req/CPU-s / bare | resp bytes | not hits | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for target in summary["targets_run"]:
        for conc in summary["concurrencies"]:
            cell = results[target].get(f"c{conc}")
            if cell is None:
                continue
            ratio = cell.get("rps_ratio_to_bare")
            cpu_ratio = cell.get("rps_per_cpu_ratio_to_bare")
            lines.append(
                f"| {target} | {conc} | {cell['rps']:,.0f} | {cell['p50_ms']:.3f} |"
                f" {cell['p99_ms']:.3f} | {'—' if ratio is None else f'{ratio:.3f}'} |"
                f" {100 * cell['server_cpu_share']:.0f}% | {cell['rps_per_cpu']:,.0f} |"
                f" {'—' if cpu_ratio is None else f'{cpu_ratio:.3f}'} |"
                f" {cell['bytes_per_response']:.0f} | {cell.get('misses', 0)} |"
                f" {cell.get('errors', 0)} |"
            )
    return lines


def render_verdicts(summary: dict[str, Any]) -> list[str]:
    labels = {
        "l1_rps_ratio_c16": ("L1 hit RPS / bare at c=16", "{:.2f}"),
        "l2_rps_ratio_c16": ("L2 hit RPS / bare at c=16", "{:.2f}"),
        "l1_p50_ms_c1": ("L1 hit p50 at c=1", "{:.3f} ms"),
        "l1_over_litellm_rps_c16": ("Strata L1 hit RPS / LiteLLM cache-hit RPS at c=16", "{:.1f}x"),
    }
    lines = []
    for name, target in summary["targets"].items():
        label, fmt = labels[name]
        bound = (
            f">= {fmt.format(target['min'])}"
            if "min" in target
            else f"< {fmt.format(target['max'])}"
        )
        lines.append(
            f"- {label}: {fmt.format(target['value'])} (target {bound}): {verdict(target['pass'])}"
        )
    for peer, info in summary.get("peers", {}).items():
        if "error" in info:
            lines.append(f"- {peer} ({info['spec']}) could not be measured: {info['error']}")
    for target, reason in summary.get("failed", {}).items():
        lines.append(f"- {target} could not be measured in this run: {reason}")
    return lines


def render_markdown(summary: dict[str, Any], machine: dict[str, Any], config: Config) -> str:
    peers = summary.get("peers", {})
    peer_line = ", ".join(
        f"{name} {info['version']} ({litellm.VENV.relative_to(ROOT)})"
        for name, info in peers.items()
        if "version" in info
    )
    lines = [
        "## Strata hit-path benchmark",
        "",
        f"- machine: {machine['nproc']} CPUs ({machine['cpu_model']}), Linux {machine['kernel']},"
        f" Python {machine['python']}, uvicorn {machine['uvicorn']} (uvloop {machine['uvloop']},"
        f" httptools {machine['httptools']}), starlette {machine['starlette']},"
        f" wrk {machine['wrk']}" + (f"; peers: {peer_line}" if peer_line else ""),
        f"- setup: 1 server worker pinned to CPU {config.server_cpu}, wrk -t1 pinned to CPU"
        f" {config.client_cpu}; {config.duration} s per cell after a {config.warmup} s warm-up;"
        f" {config.stat} of {config.rounds} interleaved round(s)"
        + (" (max RPS, min latency)" if config.stat == "best" else ""),
        f"- payload: the same {summary['answer_bytes']}-byte cached chat.completion body from every"
        f" Strata server and bare; L2 = Redis at {summary['redis']['url']}"
        + (" (private)" if summary["redis"]["private"] else ""),
        "- CPU share: the server's CPU time / wall time (below ~95% at c=16 means other processes"
        " took CPU from it); req/CPU-s: requests per CPU-second of the server, which such noise"
        " does not change; not hits: answers that were not cache hits, summed over the rounds"
        f" (tolerated up to {100 * MAX_MISS_SHARE:g}% of a cell: a Redis reply later than"
        " STRATA_REDIS_TIMEOUT is a miss by design); errors: timeouts and socket errors (tolerated"
        " for the peer only)",
        "",
        *render_table(summary),
        "",
        *render_verdicts(summary),
    ]
    return "\n".join(lines) + "\n"


def parse_list(text: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    items = tuple(item.strip() for item in text.split(",") if item.strip())
    unknown = [item for item in items if item not in allowed]
    if unknown or not items:
        raise SystemExit(f"unknown {what}: {unknown or text!r}; choose from {', '.join(allowed)}")
    return items


def parse_args(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(
        description="Benchmark Strata's L1/L2/L3 hit paths against a bare Starlette app and"
        " LiteLLM's cache hits.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured cell")
    parser.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="seconds of unrecorded wrk load before each server's measurements",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="interleaved rounds of the targets; results combine them",
    )
    parser.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help=f"comma-separated subset of {','.join(TARGETS)} (bare is the reference)",
    )
    parser.add_argument(
        "--concurrency",
        default=",".join(str(c) for c in CONCURRENCIES),
        help="comma-separated connection counts",
    )
    parser.add_argument(
        "--stat",
        choices=("best", "median"),
        default="best",
        help="how rounds combine in the table: best (max RPS, min latency; noise"
        " from other processes only ever slows a server down) or median",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("STRATA_REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="Redis for L2; a private redis-server is started if unreachable",
    )
    parser.add_argument(
        "--private-redis",
        action="store_true",
        help="always start a private redis-server pinned to the client CPU, so"
        " Redis never runs on the server's CPU (like a Redis on another host)",
    )
    parser.add_argument("--server-cpu", type=int, default=0, help="CPU the server is pinned to")
    parser.add_argument("--client-cpu", type=int, default=1, help="CPU wrk is pinned to")
    parser.add_argument(
        "--gateway-cmd",
        default=None,
        help="command that starts the gateway, before --engine-url/--host/--port"
        " (default: the venv's `strata serve`, else `python -m gateway serve`)",
    )
    parser.add_argument("--wrk", default=shutil.which("wrk") or "wrk", help="wrk binary")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument(
        "--check", action="store_true", help="exit with status 1 when a target is missed"
    )
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.rounds < 1 or args.warmup < 0:
        parser.error("--duration must be > 0, --rounds >= 1, --warmup >= 0")
    targets = parse_list(args.targets, TARGETS, "targets")
    try:
        concurrencies = tuple(int(c) for c in args.concurrency.split(",") if c.strip())
    except ValueError:
        parser.error("--concurrency takes comma-separated integers")
    if not concurrencies or min(concurrencies) < 1:
        parser.error("--concurrency takes positive integers")
    if args.gateway_cmd:
        gateway_cmd = shlex.split(args.gateway_cmd)
    else:
        script = Path(sys.executable).parent / "strata"
        gateway_cmd = (
            [str(script), "serve"]
            if script.exists()
            else [sys.executable, "-m", "gateway", "serve"]
        )
    return Config(
        duration=args.duration,
        warmup=args.warmup,
        rounds=args.rounds,
        stat=args.stat,
        redis_url=args.redis_url,
        server_cpu=args.server_cpu,
        client_cpu=args.client_cpu,
        gateway_cmd=gateway_cmd,
        wrk=args.wrk,
        out=args.out,
        check=args.check,
        private_redis=args.private_redis,
        targets=targets,
        concurrencies=concurrencies,
        json_out=args.json_out,
    )


def preflight(config: Config) -> None:
    if shutil.which(config.wrk) is None:
        raise BenchError(f"wrk not found ({config.wrk}); install it: apt-get install -y wrk")
    if shutil.which("taskset") is None:
        raise BenchError("taskset not found (util-linux)")
    cpus = os.sched_getaffinity(0)
    if config.server_cpu == config.client_cpu:
        raise BenchError("--server-cpu and --client-cpu must differ")
    for cpu in (config.server_cpu, config.client_cpu):
        if cpu not in cpus:
            raise BenchError(f"CPU {cpu} is not available to this process (have {sorted(cpus)})")
    if not LUA_SCRIPT.exists():
        raise BenchError(f"missing wrk script {LUA_SCRIPT}")


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that kill our processes


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        preflight(config)
    except BenchError as exc:
        print(f"[bench] ERROR: {exc}", file=sys.stderr)
        return 2
    machine = machine_info(config.wrk, config.server_cpu, config.client_cpu)
    workdir = Path(tempfile.mkdtemp(prefix="strata-bench-"))
    procs = Processes(workdir)
    bench = Bench(config, procs, workdir)
    try:
        summary = bench.run()
    except BenchError as exc:
        print(f"[bench] ERROR: {exc}", file=sys.stderr)
        print(f"[bench] process logs kept in {workdir}", file=sys.stderr)
        return 1
    except BaseException:
        print(f"[bench] process logs kept in {workdir}", file=sys.stderr)
        raise
    finally:
        procs.stop_all()
    shutil.rmtree(workdir, ignore_errors=True)
    markdown = render_markdown(summary, machine, config)
    print(markdown)
    if config.out is not None:
        config.out.write_text(markdown)
    record = {
        "machine": machine,
        "config": {
            "duration_s": config.duration,
            "warmup_s": config.warmup,
            "rounds": config.rounds,
            "stat": config.stat,
            "concurrencies": list(config.concurrencies),
            "targets": list(config.targets),
            "server_cpu": config.server_cpu,
            "client_cpu": config.client_cpu,
            "gateway_cmd": config.gateway_cmd,
        },
        **summary,
    }
    print(json.dumps(record, separators=(",", ":")))
    if config.json_out is not None:
        config.json_out.parent.mkdir(parents=True, exist_ok=True)
        config.json_out.write_text(json.dumps(record, indent=1))
    if config.check and not all(t["pass"] for t in summary["targets"].values()):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
