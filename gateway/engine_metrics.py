"""Metrics about the engine behind the gateway: vLLM's own numbers, and with several replicas,
how requests were routed over them.

Guarantees: the engine's `/metrics` is read when Prometheus scrapes the gateway (`refresh`,
each replica's concurrently, each bounded by `timeout`), so one scrape shows the caches' hit
rates next to the engine's prefix-cache hit rate. With one engine the families carry no label,
as they always have; with a pool (`engine.pool.EnginePool`) every engine family carries a
`replica` label (the replica's URL: a bounded set, from configuration), and the routing families
are added: requests, in-flight, health and ejections per replica, decisions by reason. Counters
are counters (`_total` on exposition), read from plain integers the pool keeps: routing updates
no metric object.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from engine import Engine, EngineClient, EngineError, EnginePool
from engine.routing import REASONS

# vLLM's names for its prefix-cache counters (newer first) and its KV-cache usage gauge.
_VLLM_QUERIES = ("vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total")
_VLLM_HITS = ("vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total")
_VLLM_KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")


def _first(samples: dict[str, float], names: tuple[str, ...]) -> float | None:
    for name in names:
        if name in samples:
            return samples[name]
    return None


def parse_totals(text: str) -> dict[str, float]:
    """Every sample of a Prometheus text page, summed over its labels (vLLM labels by engine
    index and model). ValueError for a page that is not Prometheus text."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + float(sample.value)
    return totals


class EngineMetrics:
    """The engine's own prefix-cache and KV numbers, per replica when there are several."""

    def __init__(self, engine: Engine, *, timeout: float = 1.0) -> None:
        self._engine = engine
        self._timeout = timeout
        self.pool = engine if isinstance(engine, EnginePool) else None
        self._targets: Sequence[tuple[str, Engine]] = (
            [(r.url, r.client) for r in self.pool.replicas] if self.pool else [("", engine)]
        )
        # Per target (its URL; "" for the one engine): whether /metrics answered, what it said.
        self.up: dict[str, bool] = dict.fromkeys((name for name, _ in self._targets), False)
        self.values: dict[str, dict[str, float]] = {}

    def breaker_state(self) -> tuple[bool, int]:
        """Whether engine calls fail at once, and how often that began: with one engine, its
        breaker; with a pool, open while no replica takes traffic, and every replica breaker's
        openings."""
        if self.pool is None:
            breaker = self._engine.breaker if isinstance(self._engine, EngineClient) else None
            if breaker is None:
                return False, 0
            return breaker.state != "closed", breaker.opened
        replicas = self.pool.replicas
        return all(not r.healthy for r in replicas), sum(r.client.breaker.opened for r in replicas)

    async def _fetch(self, name: str, engine: Engine) -> None:
        try:
            answer = await engine.get("/metrics", deadline=self._timeout)
            totals = parse_totals(answer.body.decode("utf-8", "replace"))
        except (EngineError, ValueError):
            self.up[name] = False
            return
        self.up[name] = answer.status == 200
        if self.up[name]:
            self.values[name] = totals

    async def refresh(self) -> None:
        await asyncio.gather(*(self._fetch(name, engine) for name, engine in self._targets))

    def families(self) -> Iterable[Metric]:
        labels = ["replica"] if self.pool is not None else []
        up = GaugeMetricFamily(
            "strata_engine_metrics_up",
            "1 if the engine's /metrics answered at the last scrape.",
            labels=labels,
        )
        queries = CounterMetricFamily(
            "strata_engine_prefix_cache_queries",
            "Tokens the engine looked up in its prefix cache (vLLM's counter).",
            labels=labels,
        )
        hits = CounterMetricFamily(
            "strata_engine_prefix_cache_hits",
            "Of those, tokens found in the prefix cache (vLLM's counter).",
            labels=labels,
        )
        usage = GaugeMetricFamily(
            "strata_engine_kv_cache_usage_ratio",
            "Share of the engine's KV-cache blocks in use (0..1).",
            labels=labels,
        )
        for name, _ in self._targets:
            label = [name] if labels else []
            up.add_metric(label, 1.0 if self.up[name] else 0.0)
            values = self.values.get(name) if self.up[name] else None
            if values is None:
                continue
            query_count, hit_count = _first(values, _VLLM_QUERIES), _first(values, _VLLM_HITS)
            if query_count is not None and hit_count is not None:
                queries.add_metric(label, query_count)
                hits.add_metric(label, hit_count)
            used = _first(values, _VLLM_KV_USAGE)
            if used is not None:
                usage.add_metric(label, used)
        yield up
        for family in (queries, hits, usage):
            if family.samples:
                yield family
        if self.pool is not None:
            yield from self._routing(self.pool)

    @staticmethod
    def _routing(pool: EnginePool) -> Iterable[Metric]:
        requests = CounterMetricFamily(
            "strata_engine_replica_requests",
            "Engine requests per replica: answered (any HTTP status), or failed without an "
            "answer (those it could not be sent to were retried on another replica).",
            labels=["replica", "result"],
        )
        in_flight = GaugeMetricFamily(
            "strata_engine_replica_in_flight",
            "Requests the gateway has in flight on each replica (streams until they close).",
            labels=["replica"],
        )
        healthy = GaugeMetricFamily(
            "strata_engine_replica_healthy",
            "1 while the replica takes traffic, 0 while it is ejected.",
            labels=["replica"],
        )
        prefixes = GaugeMetricFamily(
            "strata_engine_replica_prefixes",
            "Live prompt prefixes (affinity keys used within the prefix TTL) placed on each "
            "replica.",
            labels=["replica"],
        )
        ejections = CounterMetricFamily(
            "strata_engine_replica_ejections",
            "Times the replica was ejected: unreachable, timed out, or failing its probes.",
            labels=["replica"],
        )
        for index, replica in enumerate(pool.replicas):
            prefixes.add_metric([replica.url], pool.prefixes.counts[index])
            requests.add_metric([replica.url, "answered"], replica.answered)
            requests.add_metric([replica.url, "failed"], replica.failed)
            in_flight.add_metric([replica.url], replica.in_flight)
            healthy.add_metric([replica.url], 1.0 if replica.healthy else 0.0)
            ejections.add_metric([replica.url], replica.ejections)
        decisions = CounterMetricFamily(
            "strata_engine_routing_decisions",
            "Replica choices by reason: affinity (the prefix's own replica), overflow (a later "
            "one on the ring: the earlier ones at their bound of requests in flight or of live "
            "prefixes), least_loaded (no prefix to route by), "
            "round_robin, retry (the chosen replica could not be reached), panic (every replica "
            "was ejected; tried anyway).",
            labels=["reason"],
        )
        for reason in REASONS:
            decisions.add_metric([reason], pool.decisions[reason])
        yield from (requests, in_flight, healthy, prefixes, ejections, decisions)
