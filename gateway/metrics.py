"""Prometheus metrics for one gateway process.

Guarantees: every metric lives in the registry passed in (tests use a fresh `CollectorRegistry`);
counters end in `_total` and are counters, never gauges; the hit path updates no metric objects —
request and cache counters are plain integers, and the lookup-latency, similarity and time-to-first-
token histograms plain `gateway.histogram.PlainHistogram`s, kept by the flow and the chain and read
here at scrape time; label sets are bounded (route, status, outcome, layer, result, kind). The
engine's own numbers and the routing over replicas are `gateway.engine_metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from caches import CacheChain, MemoryCache, RedisCache
from engine.breaker import Breaker
from gateway.engine_metrics import EngineMetrics
from gateway.flow import CompletionService
from gateway.histogram import PlainHistogram

ENGINE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


def _buckets(histogram: PlainHistogram) -> list[tuple[str, float]]:
    return [
        ("+Inf" if bound == math.inf else repr(bound), count)
        for bound, count in histogram.cumulative()
    ]


def histogram_family(
    name: str, documentation: str, label: str, histograms: dict[str, PlainHistogram]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=[label])
    for value, histogram in histograms.items():
        family.add_metric([value], _buckets(histogram), histogram.sum)
    return family


class GatewayCollector(Collector):
    """Reads the flow's and the chain's counters when Prometheus scrapes."""

    def __init__(
        self, service: CompletionService, chain: CacheChain, engine: EngineMetrics
    ) -> None:
        self._service = service
        self._chain = chain
        self._engine = engine

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
        l3 = self._service.semantic
        if l3 is not None:
            s = l3.counters
            lookups.add_metric(["l3", "hit"], s.hits)
            lookups.add_metric(["l3", "miss"], s.misses)
            lookups.add_metric(["l3", "error"], s.errors)
            stores.add_metric(["l3", "ok"], s.stores)
            stores.add_metric(["l3", "error"], s.store_errors)
            errors.add_metric(["l3"], s.errors + s.store_errors)
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
            "strata_cache_entries",
            "Entries held: by L1 and L3 (in process), and by L2 as the key-presence list counts "
            "them (only while it is in sync with Redis).",
            labels=["layer"],
        )
        size = GaugeMetricFamily(
            "strata_cache_bytes", "Response bytes held by in-process layers.", labels=["layer"]
        )
        for layer in self._chain.layers:
            if isinstance(layer, MemoryCache):
                entries.add_metric([layer.name], float(len(layer)))
                size.add_metric([layer.name], float(layer.bytes))
            elif isinstance(layer, RedisCache) and layer.presence and layer.presence.synced:
                # Read off the in-process list: a scrape never walks the Redis keyspace.
                entries.add_metric([layer.name], float(len(layer.presence)))
        if l3 is not None:
            entries.add_metric(["l3"], float(l3.size))
        yield entries
        yield size

        yield from self._breakers()
        yield from self._presence()
        yield from self._flow()
        yield from self._epochs()
        yield from self._engine.families()

    def _epochs(self) -> Iterable[Metric]:
        engine = self._service.epochs.engine
        yield GaugeMetricFamily(
            "strata_model_epoch_known",
            "1 once the engine's fingerprint (models, weights, tokenizer, chat template) is "
            "known; 0 while it never was, and nothing is cached.",
            value=0.0 if engine.value is None else 1.0,
        )
        yield CounterMetricFamily(
            "strata_model_epoch_changes",
            "Times the engine's fingerprint changed: the model or its template was replaced, "
            "and entries of the old one stopped being served.",
            value=float(getattr(engine, "changes", 0)),
        )
        yield CounterMetricFamily(
            "strata_cache_generation_reloads",
            "Times this replica re-read the invalidation generations from Redis.",
            value=float(self._service.epochs.generations.reloads),
        )

    def _breakers(self) -> Iterable[Metric]:
        state = GaugeMetricFamily(
            "strata_breaker_open",
            "1 while the circuit breaker in front of the engine or a cache layer is open or "
            "half-open (calls fail at once), 0 while closed.",
            labels=["target"],
        )
        opened = CounterMetricFamily(
            "strata_breaker_opened", "Times the breaker opened.", labels=["target"]
        )
        engine_open, engine_opened = self._engine.breaker_state()
        state.add_metric(["engine"], 1.0 if engine_open else 0.0)
        opened.add_metric(["engine"], float(engine_opened))
        for target, gate in self._chain.gates.items():
            if isinstance(gate, Breaker):
                state.add_metric([target], 0.0 if gate.state == "closed" else 1.0)
                opened.add_metric([target], float(gate.opened))
        yield state
        yield opened

    def _presence(self) -> Iterable[Metric]:
        for layer in self._chain.layers:
            presence = layer.presence if isinstance(layer, RedisCache) else None
            if presence is None:
                continue
            yield GaugeMetricFamily(
                "strata_l2_presence_synced",
                "1 while the in-process list of L2 keys is in sync with Redis (misses skip the "
                "Redis round trip), 0 while every L2 lookup asks Redis.",
                value=1.0 if presence.synced else 0.0,
            )
            yield GaugeMetricFamily(
                "strata_l2_presence_keys", "L2 keys in the in-process list.", value=len(presence)
            )
            yield CounterMetricFamily(
                "strata_l2_presence_skipped_lookups",
                "L2 lookups answered as misses from the in-process list, without asking Redis.",
                value=presence.skips,
            )

    def _flow(self) -> Iterable[Metric]:
        yield histogram_family(
            "strata_cache_lookup_duration_seconds",
            "Seconds per cache lookup by layer: hits, misses and errors alike. A layer not asked "
            "(L2 known absent from the in-process key list, or its breaker open) is not timed.",
            "layer",
            self._service.lookup_seconds,
        )
        saved = CounterMetricFamily(
            "strata_tokens_saved",
            "Tokens the engine did not compute because the cache answered, by layer (or "
            "coalesced) and kind (prompt, completion), from the answers' stored usage.",
            labels=["layer", "kind"],
        )
        for name, tokens_saved in self._service.tokens_saved.items():
            saved.add_metric([name, "prompt"], tokens_saved.prompt)
            saved.add_metric([name, "completion"], tokens_saved.completion)
        yield saved
        similarity = self._service.similarity
        yield HistogramMetricFamily(
            "strata_semantic_hit_similarity",
            "Cosine similarity between the question and the cached one, of the L3 hits served.",
            buckets=_buckets(similarity),
            sum_value=similarity.sum,
        )
        yield histogram_family(
            "strata_engine_time_to_first_token_seconds",
            "Time from sending a streamed request to the engine to its first chunk, by route.",
            "route",
            self._service.ttft_seconds,
        )

        tokens = self._service.engine_tokens
        yield CounterMetricFamily(
            "strata_engine_prompt_tokens",
            "Prompt tokens of the answers the engine computed (from their usage).",
            value=tokens.prompt,
        )
        yield CounterMetricFamily(
            "strata_engine_cached_prompt_tokens",
            "Of those, prompt tokens the engine's prefix cache served "
            "(usage.prompt_tokens_details.cached_tokens).",
            value=tokens.cached,
        )


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

    def bind(
        self, service: CompletionService, chain: CacheChain, engine: EngineMetrics
    ) -> GatewayCollector:
        collector = GatewayCollector(service, chain, engine)
        self.registry.register(collector)
        return collector
