"""Hit-path benchmark: bare Starlette vs Strata's L1 and L2 cache hits, on one machine, in one run.

Serves the same ~1 KB `chat.completion` from
  (a) `bare`: a bare Starlette app (bench/bare_app.py), the physical limit for a Python ASGI server,
  (b) `l1`:   the Strata gateway answering from its in-process L1 cache,
  (c) `l2`:   the Strata gateway with L1 disabled (STRATA_L1_MAX_ENTRIES=0), answering from Redis,
each a single uvicorn worker (uvloop + httptools, no access log) pinned to one CPU while `wrk`
(one thread) runs pinned to another, and prints requests/s and p50/p99 latency at concurrency 1
and 16, with the RPS ratio to `bare` at the same concurrency.

How a run goes:
  1. Redis: the URL given (default redis://127.0.0.1:6379/0) if it answers PING, else (or always,
     with --private-redis) a private `redis-server` on a free port, pinned to the client CPU so
     it never competes with the server for its CPU. Keys use a per-run prefix
     (`bench-<pid>-<time>`), deleted at the end.
  2. The fake engine (`python -m engine.fake --answer-bytes 1000`), pinned to the client CPU.
  3. Priming: a gateway with L1 disabled takes one miss (stored in Redis), then serves the same
     request as an L2 hit; the hit's body bytes are what the bare app serves, so every server sends
     identical payloads.
  4. For each round, for each of bare, l1, l2: start the server pinned to the server CPU, wait
     for /healthz, send a few requests and check they are hits from the expected layer (abort
     otherwise), run an unrecorded wrk warm-up, then the measured runs at c=1 and c=16, then stop
     it. Rounds interleave the servers so that machine noise hits all of them alike; the table
     shows the best of the rounds (--stat median for medians; the JSON has both and every sample).
  5. Every wrk response is checked by bench/post.lua (2xx; and, for l1/l2, `X-Strata-Cache: hit`
     with the right `X-Strata-Layer`); any non-2xx, miss, wrong layer or socket error fails the
     run loudly.
Every process started is killed at the end (process groups), even on errors or Ctrl-C.

On a shared machine other processes take CPU time from the pinned server; the table therefore also
shows the server's CPU share during each cell and its requests per CPU-second, a cost measure that
such noise leaves alone (at c=16, RPS / bare and req/CPU-s / bare should agree when the run is
clean).

Run (from the repository root; needs wrk, taskset and 2+ CPUs):
    .venv/bin/python -m bench.hit_path                  # 10 s per cell, 3 rounds
    .venv/bin/python -m bench.hit_path --duration 5 --rounds 1 --out bench/results.md
    .venv/bin/python -m bench.hit_path --private-redis --check   # exit 1 when a target is missed
Output: a markdown table (also written to --out), target verdicts, and a final line of JSON with
every number (including each round's raw samples and per-CPU busy/steal time).
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
CONCURRENCIES = (1, 16)
TARGETS = ("bare", "l1", "l2")
UVICORN_FLAGS = ["--loop", "uvloop", "--http", "httptools", "--no-access-log"]
UVICORN_FLAGS += ["--log-level", "warning"]
# The acceptance targets.
L1_RPS_RATIO_MIN = 0.40  # L1 hit RPS / bare RPS at c=16
L2_RPS_RATIO_MIN = 0.25  # L2 hit RPS / bare RPS at c=16
L1_P50_MAX_MS = 0.25  # L1 hit p50 at c=1


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

    def describe(self) -> str:
        return (
            f"status {self.status}, X-Strata-Cache={self.cache!r}, X-Strata-Layer={self.layer!r},"
            f" body {self.body[:200]!r}"
        )


def post(conn: http.client.HTTPConnection) -> Reply:
    conn.request("POST", PATH, body=REQUEST_BODY, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    body = resp.read()
    return Reply(
        resp.status, resp.getheader("X-Strata-Cache"), resp.getheader("X-Strata-Layer"), body
    )


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


def run_wrk(
    wrk: str,
    port: int,
    *,
    connections: int,
    duration: int,
    expect_layer: str | None,
    client_cpu: int,
    label: str,
) -> tuple[dict[str, Any], str]:
    cmd = [
        "taskset", "-c", str(client_cpu), wrk,
        "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "5s",
        "-s", str(LUA_SCRIPT), f"http://{HOST}:{port}{PATH}",
    ]  # fmt: skip
    env = {
        **os.environ,
        "STRATA_BENCH_BODY": REQUEST_BODY,
        "STRATA_BENCH_EXPECT_LAYER": expect_layer or "",
    }
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
    problems = [
        f"{name}={stats[name]}"
        for name in (
            "non_2xx",
            "not_hit",
            "wrong_layer",
            "connect_errors",
            "read_errors",
            "write_errors",
            "status_errors",
            "timeouts",
        )
        if stats.get(name)
    ]
    # wrk's own summary lines, as a second check on the script's counters.
    if "Non-2xx or 3xx responses" in text:
        problems.append("wrk reported non-2xx/3xx responses")
    if "Socket errors" in text:
        problems.append("wrk reported socket errors")
    if stats.get("requests", 0) <= 0:
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

    # --- servers ---

    def start_server(self, target: str, name: str | None = None) -> tuple[Proc, int]:
        port = free_port()
        name = name or target
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
            }
            if target == "l2":
                extra["STRATA_L1_MAX_ENTRIES"] = "0"
            env = self.env(**extra)
        proc = self.procs.start(name, cmd, env=env, cpu=self.config.server_cpu)
        wait_http(proc, port, "/healthz")
        affinity = os.sched_getaffinity(proc.popen.pid)
        if affinity != {self.config.server_cpu}:
            raise BenchError(f"{name} is not pinned to CPU {self.config.server_cpu}: {affinity}")
        return proc, port

    def prime(self) -> None:
        """Store the answer in Redis through the gateway and keep the hit's bytes for `bare`."""
        proc, port = self.start_server("l2", name="prime")
        try:
            conn = http.client.HTTPConnection(HOST, port, timeout=30)
            first = post(conn)
            if first.status != 200:
                raise BenchError(f"priming request failed: {first.describe()}")
            reply = first
            deadline = time.monotonic() + 5  # the gateway may store in the background
            while time.monotonic() < deadline:
                reply = post(conn)
                if reply.status == 200 and reply.cache == "hit" and reply.layer == "l2":
                    break
                time.sleep(0.05)
            else:
                raise BenchError(
                    "the gateway never served the primed request as an L2 hit; first reply: "
                    f"{first.describe()}; last reply: {reply.describe()}\nlog:\n{proc.tail()}"
                )
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
            replies = [post(conn) for _ in range(20)]
        finally:
            conn.close()
        for reply in replies[-10:]:
            ok = reply.status == 200
            if target != "bare":
                ok = ok and reply.cache == "hit" and reply.layer == target
            if not ok:
                want = "200" if target == "bare" else f"200 with X-Strata-Cache=hit, layer {target}"
                raise BenchError(f"{target}: warm-up request is not a {want}: {reply.describe()}")
        body = replies[-1].body
        if len(body) != len(self.answer):
            self.log(
                f"note: {target} answers {len(body)} body bytes, the primed answer has "
                f"{len(self.answer)}"
            )

    def measure_target(self, target: str, round_no: int) -> None:
        cfg = self.config
        proc, port = self.start_server(target)
        try:
            self.verify(target, port)
            expect = None if target == "bare" else target
            if cfg.warmup > 0:
                run_wrk(
                    cfg.wrk,
                    port,
                    connections=max(CONCURRENCIES),
                    duration=cfg.warmup,
                    expect_layer=expect,
                    client_cpu=cfg.client_cpu,
                    label=f"{target} warm-up",
                )
            for conc in CONCURRENCIES:
                label = f"round {round_no} {target} c={conc}"
                before = read_cpu_times()
                cpu_before = group_cpu_seconds(proc.popen.pid)
                stats, _ = run_wrk(
                    cfg.wrk,
                    port,
                    connections=conc,
                    duration=cfg.duration,
                    expect_layer=expect,
                    client_cpu=cfg.client_cpu,
                    label=label,
                )
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
                )
                self.samples.append(sample)
                self.log(
                    f"{label}: {sample.rps:.0f} req/s, p50 {sample.p50_us} us, p99 "
                    f"{sample.p99_us} us; server used {100 * sample.server_cpu_share:.0f}% of a"
                    f" CPU ({sample.rps_per_cpu:.0f} req per CPU-s); CPU {cfg.server_cpu} busy"
                    f" {sample.server_cpu.get('busy_pct')}%,"
                    f" steal {sample.server_cpu.get('steal_pct')}%"
                )
        finally:
            self.procs.stop(proc)

    def run(self) -> dict[str, Any]:
        self.ensure_redis()
        try:
            self.start_engine()
            self.prime()
            for round_no in range(1, self.config.rounds + 1):
                for target in TARGETS:
                    self.measure_target(target, round_no)
        finally:
            self.cleanup_redis()
        return self.summarise()

    # --- results ---

    def summarise(self) -> dict[str, Any]:
        results = {stat: combine(self.samples, stat) for stat in ("best", "median")}
        chosen = results[self.config.stat]
        l1_ratio = chosen["l1"]["c16"]["rps_ratio_to_bare"]
        l2_ratio = chosen["l2"]["c16"]["rps_ratio_to_bare"]
        l1_p50 = chosen["l1"]["c1"]["p50_ms"]
        targets = {
            "l1_rps_ratio_c16": {
                "value": l1_ratio,
                "min": L1_RPS_RATIO_MIN,
                "pass": l1_ratio >= L1_RPS_RATIO_MIN,
            },
            "l2_rps_ratio_c16": {
                "value": l2_ratio,
                "min": L2_RPS_RATIO_MIN,
                "pass": l2_ratio >= L2_RPS_RATIO_MIN,
            },
            "l1_p50_ms_c1": {"value": l1_p50, "max": L1_P50_MAX_MS, "pass": l1_p50 < L1_P50_MAX_MS},
        }
        return {
            "stat": self.config.stat,
            "results": chosen,
            "results_by_stat": results,
            "targets": targets,
            "answer_bytes": len(self.answer),
            "redis": {"url": self.redis_url, "private": self.private_redis},
            "samples": [asdict(s) for s in self.samples],
        }


def combine(samples: list[Sample], stat: str) -> dict[str, dict[str, dict[str, Any]]]:
    """A cell per (target, concurrency) over the rounds: best (max rate, min latency) or median."""
    high = max if stat == "best" else statistics.median
    low = min if stat == "best" else statistics.median
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for target in TARGETS:
        results[target] = {}
        for conc in CONCURRENCIES:
            cell = [s for s in samples if s.target == target and s.concurrency == conc]
            results[target][f"c{conc}"] = {
                "rps": round(high([s.rps for s in cell]), 1),
                "p50_ms": round(low([s.p50_us for s in cell]) / 1000, 3),
                "p99_ms": round(low([s.p99_us for s in cell]) / 1000, 3),
                "rps_per_cpu": round(high([s.rps_per_cpu for s in cell]), 1),
                "server_cpu_share": round(high([s.server_cpu_share for s in cell]), 3),
                "bytes_per_response": cell[-1].bytes_per_response,
                "rounds": len(cell),
            }
    for target in TARGETS:
        for conc in CONCURRENCIES:
            cell, bare = results[target][f"c{conc}"], results["bare"][f"c{conc}"]
            cell["rps_ratio_to_bare"] = round(cell["rps"] / bare["rps"], 3)
            cell["p50_ratio_to_bare"] = round(cell["p50_ms"] / bare["p50_ms"], 3)
            cell["rps_per_cpu_ratio_to_bare"] = (
                round(cell["rps_per_cpu"] / bare["rps_per_cpu"], 3) if bare["rps_per_cpu"] else 0.0
            )
    return results


def render_markdown(summary: dict[str, Any], machine: dict[str, Any], config: Config) -> str:
    results, targets = summary["results"], summary["targets"]
    lines = [
        "## Strata hit-path benchmark",
        "",
        f"- machine: {machine['nproc']} CPUs ({machine['cpu_model']}), Linux {machine['kernel']},"
        f" Python {machine['python']}, uvicorn {machine['uvicorn']} (uvloop {machine['uvloop']},"
        f" httptools {machine['httptools']}), starlette {machine['starlette']},"
        f" wrk {machine['wrk']}",
        f"- setup: 1 uvicorn worker pinned to CPU {config.server_cpu}, wrk -t1 pinned to CPU"
        f" {config.client_cpu}; {config.duration} s per cell after a {config.warmup} s warm-up;"
        f" {config.stat} of {config.rounds} interleaved round(s)"
        + (" (max RPS, min latency)" if config.stat == "best" else ""),
        f"- payload: the same {summary['answer_bytes']}-byte cached chat.completion body from every"
        f" server; L2 = Redis at {summary['redis']['url']}"
        + (" (private)" if summary["redis"]["private"] else ""),
        "- CPU share: the server's CPU time / wall time (below ~95% at c=16 means other processes"
        " took CPU from it); req/CPU-s: requests per CPU-second of the server, which such noise"
        " does not change",
        "",
        "| path | conc | RPS | p50 ms | p99 ms | RPS / bare | CPU share | req/CPU-s |"
        " req/CPU-s / bare | resp bytes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for target in TARGETS:
        for conc in CONCURRENCIES:
            cell = results[target][f"c{conc}"]
            lines.append(
                f"| {target} | {conc} | {cell['rps']:,.0f} | {cell['p50_ms']:.3f} |"
                f" {cell['p99_ms']:.3f} | {cell['rps_ratio_to_bare']:.2f} |"
                f" {100 * cell['server_cpu_share']:.0f}% | {cell['rps_per_cpu']:,.0f} |"
                f" {cell['rps_per_cpu_ratio_to_bare']:.2f} | {cell['bytes_per_response']:.0f} |"
            )
    t1, t2, t3 = targets["l1_rps_ratio_c16"], targets["l2_rps_ratio_c16"], targets["l1_p50_ms_c1"]

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    lines += [
        "",
        f"- L1 hit RPS / bare at c=16: {t1['value']:.2f} (target >= {t1['min']:.2f}):"
        f" {verdict(t1['pass'])}",
        f"- L2 hit RPS / bare at c=16: {t2['value']:.2f} (target >= {t2['min']:.2f}):"
        f" {verdict(t2['pass'])}",
        f"- L1 hit p50 at c=1: {t3['value']:.3f} ms (target < {t3['max']:.2f} ms):"
        f" {verdict(t3['pass'])}",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(
        description="Benchmark Strata's L1/L2 hit paths against a bare Starlette app.",
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
        help="interleaved rounds of (bare, l1, l2); results combine them",
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
    parser.add_argument(
        "--check", action="store_true", help="exit with status 1 when a target is missed"
    )
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.rounds < 1 or args.warmup < 0:
        parser.error("--duration must be > 0, --rounds >= 1, --warmup >= 0")
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
            "concurrencies": list(CONCURRENCIES),
            "gateway_cmd": config.gateway_cmd,
        },
        **summary,
    }
    print(json.dumps(record, separators=(",", ":")))
    if config.check and not all(t["pass"] for t in summary["targets"].values()):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
