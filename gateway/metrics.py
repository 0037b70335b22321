"""Prometheus metrics for one gateway process.

Guarantees: every metric lives in the registry passed in (tests use a fresh `CollectorRegistry`);
counters end in `_total` and are counters, never gauges; the hit path updates no metric objects —
request and cache counters are plain integers kept by the flow and the chain and read here at scrape
time; label sets are bounded (route, status, outcome, layer, result).
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from caches import CacheChain, MemoryCache
from gateway.flow import CompletionService

ENGINE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class GatewayCollector(Collector):
    """Reads the flow's and the chain's counters when Prometheus scrapes."""

    def __init__(self, service: CompletionService, chain: CacheChain) -> None:
        self._service = service
        self._chain = chain

    def collect(self) -> Iterable[Metric]:
        requests = CounterMetricFamily(
            "strata_requests",
            "Completion requests answered, by route, HTTP status and how they were served.",
            labels=["route", "status", "outcome"],
        )
        for (route, status, outcome), count in sorted(self._service.outcomes.items()):
            requests.add_metric([route, str(status), outcome], count)
        yield requests

        lookups = CounterMetricFamily(
            "strata_cache_lookups",
            "Cache lookups by layer and result (hit, miss, error).",
            labels=["layer", "result"],
        )
        stores = CounterMetricFamily(
            "strata_cache_stores",
            "Cache writes by layer and result (ok, error).",
            labels=["layer", "result"],
        )
        errors = CounterMetricFamily(
            "strata_cache_errors",
            "Failed cache operations (lookups and writes) by layer; each was served as a miss.",
            labels=["layer"],
        )
        for name, c in self._chain.counters.items():
            lookups.add_metric([name, "hit"], c.hits)
            lookups.add_metric([name, "miss"], c.misses)
            lookups.add_metric([name, "error"], c.errors)
            stores.add_metric([name, "ok"], c.stores)
            stores.add_metric([name, "error"], c.store_errors)
            errors.add_metric([name], c.errors + c.store_errors)
        yield lookups
        yield stores
        yield errors

        up = GaugeMetricFamily(
            "strata_cache_layer_up",
            "1 while the layer's last operation succeeded, 0 while it is failing.",
            labels=["layer"],
        )
        for layer in self._chain.layers:
            up.add_metric([layer.name], 0.0 if self._chain.failing(layer.name) else 1.0)
        yield up

        entries = GaugeMetricFamily(
            "strata_cache_entries", "Entries held by in-process layers.", labels=["layer"]
        )
        size = GaugeMetricFamily(
            "strata_cache_bytes", "Response bytes held by in-process layers.", labels=["layer"]
        )
        for layer in self._chain.layers:
            if isinstance(layer, MemoryCache):
                entries.add_metric([layer.name], float(len(layer)))
                size.add_metric([layer.name], float(layer.bytes))
        yield entries
        yield size


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.engine_seconds = Histogram(
            "strata_engine_request_duration_seconds",
            "Time from sending a request to the engine to having its whole answer.",
            labelnames=["route"],
            buckets=ENGINE_BUCKETS,
            registry=registry,
        )

    def observe_engine(self, route: str, seconds: float) -> None:
        self.engine_seconds.labels(route).observe(seconds)

    def bind(self, service: CompletionService, chain: CacheChain) -> GatewayCollector:
        collector = GatewayCollector(service, chain)
        self.registry.register(collector)
        return collector
