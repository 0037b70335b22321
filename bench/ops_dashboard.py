"""The operations dashboard from a real run: a gateway under mixed traffic, its /metrics scraped
every second, plotted like the Grafana dashboard (deploy/grafana/dashboards/strata.json).

Processes (own process groups, all killed at the end): the fake engine (a fixed think time, a
first-token delay and paced chunks, so engine latency and time to first token are visible), a
private redis-server, and the gateway (`strata serve`, L1 kept small so that colder repeats fall
through to L2). The load, at --rate requests/s from --workers keep-alive connections: repeats of a
few hundred questions, hot ones more often (L1 and L2 hits), streamed repeats (replayed hits),
streamed and plain new questions (misses), and with --semantic, rephrased repeats (L3). Halfway
through, Redis is paused for --outage seconds (SIGSTOP, then SIGCONT): L2 fails, its breaker opens,
requests go on as misses, and it recovers.

Every second it reads /metrics; rates are over a sliding --window of scrapes (seconds, at one a
second) and quantiles are `histogram_quantile` over the bucket increases in that window, as the
dashboard's PromQL does. The figure is a 2x3 grid: requests/s by outcome, hit ratio per layer,
lookup latency p50/p99 per layer, tokens saved/s by layer, engine latency and time to first token,
breakers and layers up. At the end it prints `strata cache stats` of the gateway and a line of
JSON. Not part of `make test`:

    .venv/bin/python -m bench.ops_dashboard                       # 75 s, L3 off
    .venv/bin/python -m bench.ops_dashboard --seconds 90 --semantic --out /tmp/dash.png
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from prometheus_client.parser import text_string_to_metric_families

from bench.hit_path import HOST, BenchError, Processes
from bench.soak import drive, start_fake_stack
from bench.soak import sample as scrape
from gateway.cli import main as cli

ROOT = Path(__file__).resolve().parent.parent
MODEL = "strata-fake"
PATH = "/v1/chat/completions"
LAYER_COLORS = {"l1": "tab:blue", "l2": "tab:orange", "l3": "tab:green", "coalesced": "tab:purple"}
OUTCOME_COLORS = {"hit": "tab:green", "miss": "tab:red", "coalesced": "tab:purple",
                  "bypass": "tab:gray", "error": "black"}  # fmt: skip

Labels = tuple[tuple[str, str], ...]
Snapshot = dict[tuple[str, Labels], float]


# --------------------------------------------------------------------------- traffic


def question(k: int) -> str:
    return f"Question {k}: what does cache layer {k % 7} keep for tenant {k % 5}?"


def rephrased(k: int) -> str:
    return f"For tenant {k % 5}, what does cache layer {k % 7} keep? (question {k})"


def next_body(rng: random.Random, tag: str, n: int, *, semantic: bool, pool: int) -> bytes:
    """One request of the mix: a repeat (hot ones more often), a streamed repeat, a new question
    streamed or not, and with L3 a rephrased repeat."""
    roll = rng.random()
    hot = min(pool - 1, int(rng.expovariate(1 / (pool / 6))))
    stream = False
    if roll < 0.50:
        content = question(hot)
    elif roll < 0.58:
        content, stream = question(hot), True
    elif roll < 0.72:
        content, stream = f"New {tag}-{n}: stream me something about paged attention.", True
    elif roll < 0.88 or not semantic:
        content = f"New {tag}-{n}: tell me about prefix caching."
    else:
        content = rephrased(hot)
    return orjson.dumps(
        {"model": MODEL, "temperature": 0, "max_tokens": 64, "stream": stream,
         "messages": [{"role": "user", "content": content}]}
    )  # fmt: skip


# --------------------------------------------------------------------------- metrics


def parse(text: str) -> Snapshot:
    body = text.split("\r\n\r\n", 1)[1] if text.startswith("HTTP/") else text
    if "transfer-encoding: chunked" in text.split("\r\n\r\n", 1)[0].lower():
        body = dechunk(body)
    snapshot: Snapshot = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            if s.name.startswith("strata_"):
                snapshot[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return snapshot


def dechunk(body: str) -> str:
    out, rest = [], body
    while rest:
        size_line, _, rest = rest.partition("\r\n")
        size = int(size_line.split(";")[0] or "0", 16)
        if size == 0:
            break
        out.append(rest[:size])
        rest = rest[size + 2 :]
    return "".join(out)


def grouped(
    snapshot: Snapshot, name: str, by: tuple[str, ...], **match: str
) -> dict[Labels, float]:
    """sum by (`by`) (name{match})."""
    sums: dict[Labels, float] = defaultdict(float)
    for (metric, labels), value in snapshot.items():
        if metric != name:
            continue
        found = dict(labels)
        if all(found.get(k) == v for k, v in match.items()):
            sums[tuple((k, found.get(k, "")) for k in by)] += value
    return dict(sums)


@dataclass
class Series:
    """Scrapes over time; rates and quantiles over a sliding window of them."""

    window: int
    times: list[float] = field(default_factory=list)
    snapshots: list[Snapshot] = field(default_factory=list)

    def add(self, t: float, snapshot: Snapshot) -> None:
        self.times.append(t)
        self.snapshots.append(snapshot)

    def _pairs(self) -> Iterable[tuple[float, float, Snapshot, Snapshot]]:
        for i in range(self.window, len(self.snapshots)):
            j = i - self.window
            yield self.times[i], self.times[i] - self.times[j], self.snapshots[j], self.snapshots[i]

    def gauge(self, name: str) -> dict[str, list[tuple[float, float]]]:
        """Every series of gauge `name` as scraped (those in the last scrape)."""
        keys = sorted(labels for metric, labels in self.snapshots[-1] if metric == name)
        return {
            "/".join(v for _, v in key): [
                (t, s.get((name, key), math.nan))
                for t, s in zip(self.times, self.snapshots, strict=True)
            ]
            for key in keys
        }

    def rate(
        self, name: str, by: tuple[str, ...], **match: str
    ) -> dict[str, list[tuple[float, float]]]:
        """rate(name[window]) summed by `by`: {"a/b": [(t, per second)]}."""
        out: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for t, span, old, new in self._pairs():
            before = grouped(old, name, by, **match)
            for labels, value in grouped(new, name, by, **match).items():
                increase = max(0.0, value - before.get(labels, 0.0))  # a counter never goes down
                out["/".join(v for _, v in labels)].append((t, increase / span))
        return dict(out)

    def ratio(
        self,
        num: Callable[[Snapshot], dict[Labels, float]],
        den: Callable[[Snapshot], dict[Labels, float]],
    ) -> dict[str, list[tuple[float, float]]]:
        out: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for t, _, old, new in self._pairs():
            n_old, n_new, d_old, d_new = num(old), num(new), den(old), den(new)
            for labels, value in d_new.items():
                d = value - d_old.get(labels, 0.0)
                n = n_new.get(labels, 0.0) - n_old.get(labels, 0.0)
                out["/".join(v for _, v in labels)].append((t, n / d if d > 0 else math.nan))
        return dict(out)

    def quantile(
        self, q: float, name: str, by: tuple[str, ...]
    ) -> dict[str, list[tuple[float, float]]]:
        """histogram_quantile(q, sum by (by, le) (rate(name_bucket[window])))."""
        out: dict[str, list[tuple[float, float]]] = defaultdict(list)
        bucket = f"{name}_bucket"
        for t, _, old, new in self._pairs():
            before = grouped(old, bucket, (*by, "le"))
            groups: dict[Labels, list[tuple[float, float]]] = defaultdict(list)
            for labels, value in grouped(new, bucket, (*by, "le")).items():
                *group, (_, le) = labels
                groups[tuple(group)].append((float(le), value - before.get(labels, 0.0)))
            for key, buckets in groups.items():
                out["/".join(v for _, v in key) or "all"].append(
                    (t, histogram_quantile(q, buckets))
                )
        return dict(out)


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' estimate: linear interpolation inside the bucket holding the rank."""
    buckets.sort()
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return math.nan
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, cumulative in buckets:
        if cumulative >= rank:
            if math.isinf(bound):
                return lower
            inside = cumulative - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, cumulative
    return lower


async def collect(
    args: argparse.Namespace, port: int, redis_pid: int
) -> tuple[Series, dict[str, Any]]:
    series = Series(window=args.window)
    started = time.monotonic()
    until = started + args.seconds
    counts: dict[str, int] = {}
    outage = (args.seconds / 2, args.seconds / 2 + args.outage) if args.outage > 0 else None
    paused = False
    rng = random.Random(args.seed)
    tag = uuid.uuid4().hex[:6]

    def make_body(n: int) -> bytes:
        return next_body(rng, tag, n, semantic=args.semantic, pool=args.pool)

    load = asyncio.create_task(drive(port, args.rate, args.workers, until, counts, make_body))
    try:
        while not load.done():
            t = time.monotonic() - started
            if outage is not None and not paused and outage[0] <= t < outage[1]:
                os.kill(redis_pid, signal.SIGSTOP)
                paused = True
                print(f"[ops] {t:5.1f} s  Redis paused", file=sys.stderr, flush=True)
            elif paused and outage is not None and t >= outage[1]:
                os.kill(redis_pid, signal.SIGCONT)
                paused = False
                print(f"[ops] {t:5.1f} s  Redis resumed", file=sys.stderr, flush=True)
            series.add(t, parse(await scrape(port)))
            if int(t) % 10 == 0:
                print(f"[ops] {t:5.1f} s  replies {counts}", file=sys.stderr, flush=True)
            await asyncio.wait(
                {load}, timeout=max(0.0, args.every - (time.monotonic() - started - t))
            )
        await load
    finally:
        if paused:
            os.kill(redis_pid, signal.SIGCONT)
    return series, {"replies": counts, "outage": outage}


# --------------------------------------------------------------------------- figure


def plot(series: Series, meta: dict[str, Any], args: argparse.Namespace, out: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(2, 3, figsize=(18, 9.5), sharex=True)
    (requests, ratio, lookup), (saved, engine, health) = axes

    def lines(
        ax: Any,
        data: dict[str, list[tuple[float, float]]],
        colors: dict[str, str] | None = None,
        style: str = "-",
        suffix: str = "",
        scale: float = 1.0,
    ) -> None:
        for name, points in sorted(data.items()):
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            color = (colors or {}).get(name.split("/")[0])
            label = suffix.strip() if name == "all" else f"{name}{suffix}"
            ax.plot(xs, [y * scale for y in ys], style, color=color, label=label, lw=1.4)

    lines(requests, series.rate("strata_requests_total", ("outcome",)), OUTCOME_COLORS)
    requests.set_title("Requests by outcome (per second)")

    def hits(s: Snapshot) -> dict[Labels, float]:
        return grouped(s, "strata_cache_lookups_total", ("layer",), result="hit")

    def lookups(s: Snapshot) -> dict[Labels, float]:
        return grouped(s, "strata_cache_lookups_total", ("layer",))

    lines(ratio, series.ratio(hits, lookups), LAYER_COLORS)

    share: Labels = (("", "from the cache"),)

    def cached(s: Snapshot) -> dict[Labels, float]:
        hit = grouped(s, "strata_requests_total", (), outcome="hit").get((), 0.0)
        return {
            share: hit + grouped(s, "strata_requests_total", (), outcome="coalesced").get((), 0.0)
        }

    def answered(s: Snapshot) -> dict[Labels, float]:
        return {share: grouped(s, "strata_requests_total", ()).get((), 0.0)}

    lines(ratio, series.ratio(cached, answered), {"from the cache": "black"}, style="--")
    ratio.set_ylim(0, 1.02)
    ratio.set_title("Hit ratio per layer (hits / lookups); dashed: answered from the cache")

    name = "strata_cache_lookup_duration_seconds"
    lines(lookup, series.quantile(0.5, name, ("layer",)), LAYER_COLORS, suffix=" p50", scale=1000)
    lines(lookup, series.quantile(0.99, name, ("layer",)), LAYER_COLORS, "--", " p99", 1000)
    lookup.set_yscale("log")
    lookup.set_ylabel("ms")
    lookup.set_title("Cache lookup latency per layer (p50 solid, p99 dashed)")

    lines(saved, series.rate("strata_tokens_saved_total", ("layer",), kind="prompt"), LAYER_COLORS,
          suffix=" prompt")  # fmt: skip
    lines(saved, series.rate("strata_tokens_saved_total", ("layer",), kind="completion"),
          LAYER_COLORS, "--", " completion")  # fmt: skip
    saved.set_title("Tokens saved by the cache (per second)")

    engine_name = "strata_engine_request_duration_seconds"
    ttft_name = "strata_engine_time_to_first_token_seconds"
    lines(engine, series.quantile(0.5, engine_name, ()), {"all": "tab:red"}, suffix=" engine p50",
          scale=1000)  # fmt: skip
    lines(engine, series.quantile(0.99, engine_name, ()), {"all": "tab:red"}, "--", " engine p99",
          1000)  # fmt: skip
    lines(engine, series.quantile(0.5, ttft_name, ()), {"all": "tab:blue"}, suffix=" TTFT p50",
          scale=1000)  # fmt: skip
    engine.set_ylabel("ms")
    engine.set_title("Engine request duration (p50, p99) and time to first token (p50)")

    gauges = [("breaker", series.gauge("strata_breaker_open"), 0.0),
              ("layer up", series.gauge("strata_cache_layer_up"), 0.03)]  # fmt: skip
    for prefix, data, offset in gauges:  # the offset keeps overlapping lines apart
        for label, points in sorted(data.items()):
            xs, ys = zip(*points, strict=True)
            health.step(xs, [y + offset for y in ys], where="post", label=f"{prefix} {label}")
    health.set_ylim(-0.1, 1.2)
    health.set_title("Breakers open (1) and cache layers up (1)")

    outage = meta.get("outage")
    for ax in axes.flat:
        if outage is not None:
            ax.axvspan(*outage, color="0.85", zorder=0, label="Redis paused")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        ax.set_xlabel("seconds")
    l3 = "L3 on (all-MiniLM-L6-v2)" if args.semantic else "L3 off"
    fig.suptitle(
        f"Strata: {args.seconds:g} s of mixed traffic at {args.rate:g} req/s, fake engine, real "
        f"Redis, {l3}; /metrics scraped every {args.every:g} s, rates over {args.window} s",
        fontsize=12,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=75.0, help="length of the traffic")
    parser.add_argument("--rate", type=float, default=40.0, help="requests per second")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--pool", type=int, default=400, help="distinct repeated questions")
    parser.add_argument("--l1-entries", type=int, default=150, help="L1 capacity (entries)")
    parser.add_argument(
        "--outage", type=float, default=8.0, help="seconds Redis is paused; 0: none"
    )
    parser.add_argument("--every", type=float, default=1.0, help="seconds between scrapes")
    parser.add_argument("--window", type=int, default=5, help="scrapes per rate window")
    parser.add_argument("--semantic", action="store_true", help="turn L3 on (loads all-MiniLM)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "operations-dashboard.png")
    args = parser.parse_args(argv)

    begun = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="strata-ops-"))
    procs = Processes(workdir)
    try:
        gateway_env = {"STRATA_L1_MAX_ENTRIES": str(args.l1_entries)}
        if args.semantic:
            gateway_env["STRATA_SEMANTIC"] = "on"
        _, redis, port = start_fake_stack(
            procs,
            engine_args=["--answer-bytes", "300", "--delay", "0.03", "--first-token-delay",
                         "0.06", "--chunk-delay", "0.002"],
            gateway_env=gateway_env,
            ready_timeout=180,
        )  # fmt: skip
        ready = time.monotonic() - begun
        series, meta = asyncio.run(collect(args, port, redis.popen.pid))
        plot(series, meta, args, args.out)
        cli(["cache", "stats", "--url", f"http://{HOST}:{port}"])  # the same numbers, as a table
    except BenchError as exc:
        print(f"[ops] ERROR: {exc}\n[ops] logs in {workdir}", file=sys.stderr)
        return 1
    finally:
        with contextlib.suppress(Exception):
            procs.stop_all()
    shutil.rmtree(workdir, ignore_errors=True)
    final = series.snapshots[-1]
    summary = {
        "png": str(args.out),
        "seconds_total": round(time.monotonic() - begun, 1),
        "seconds_to_ready": round(ready, 1),
        "replies": meta["replies"],
        "lookups": {"/".join(v for _, v in k): v for k, v in
                    grouped(final, "strata_cache_lookups_total", ("layer", "result")).items()},
        "tokens_saved": {"/".join(v for _, v in k): v for k, v in
                         grouped(final, "strata_tokens_saved_total", ("layer", "kind")).items()},
    }  # fmt: skip
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
