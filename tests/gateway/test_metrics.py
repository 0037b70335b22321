"""The hit path's own metrics: the plain histogram, lookup latency per layer, tokens saved per
layer, the similarity of L3 hits, the engine's time to first token, and the admin stats built on
the same counters."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest

from caches.embedder import EmbeddingBatcher, HashingEmbedder
from caches.semantic import SemanticCache
from caches.vector_index import VectorIndex
from engine.fake import FakeEngine
from gateway.histogram import LOOKUP_BUCKETS, PlainHistogram
from tests.caches.semantic_fakes import CosineVerifier
from tests.clock import FakeClock
from tests.gateway.harness import MODEL, Harness, chat_body, gateway, semantic_gateway

QUESTION = "how do i reset my password"
PARAPHRASE = "my password how do i reset"  # same words: cosine 1.0 with the hashing embedder

# --- the histogram object ---


def test_a_value_goes_in_the_first_bucket_whose_bound_is_at_least_it() -> None:
    histogram = PlainHistogram((0.1, 0.5, 1.0))
    for value in (0.05, 0.1, 0.2, 0.5, 1.0, 3.0):
        histogram.observe(value)
    assert histogram.counts == [2, 2, 1, 1]  # <=0.1, <=0.5, <=1.0, +Inf
    assert histogram.cumulative() == [(0.1, 2), (0.5, 4), (1.0, 5), (math.inf, 6)]
    assert histogram.count == 6
    assert histogram.sum == pytest.approx(4.85)


def test_an_empty_histogram_reads_as_zeros() -> None:
    histogram = PlainHistogram(LOOKUP_BUCKETS)
    assert histogram.count == 0
    assert histogram.sum == 0.0
    assert [count for _, count in histogram.cumulative()] == [0] * (len(LOOKUP_BUCKETS) + 1)


@pytest.mark.parametrize(
    "bounds",
    [(), (0.5, 0.5), (1.0, 0.5), (0.1, math.inf), (math.nan,)],
    ids=["empty", "repeated", "decreasing", "infinite", "nan"],
)
def test_bucket_bounds_must_be_finite_and_increasing(bounds: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match=r"bucket|bound"):
        PlainHistogram(bounds)


# --- through the gateway ---


def l3_cache(clock: FakeClock) -> SemanticCache:
    return SemanticCache(
        batcher=EmbeddingBatcher(HashingEmbedder(64)),
        verifier=CosineVerifier(0.95),
        index=VectorIndex(64, clock=clock),
        min_similarity=0.5,
        clock=clock,
    )


def usage_of(response: Any) -> tuple[int, int]:
    usage = response.json()["usage"]
    return usage["prompt_tokens"], usage["completion_tokens"]


def sample(gw: Harness, name: str, **labels: str) -> float:
    value = gw.registry.get_sample_value(name, labels)
    assert value is not None, f"{name}{labels} is not exported"
    return value


async def test_hits_in_every_layer_record_latency_tokens_saved_and_similarity() -> None:
    clock = FakeClock()
    l3 = l3_cache(clock)
    try:
        async with gateway(semantic=l3, clock=clock) as gw:
            miss = await gw.chat(chat_body(QUESTION))
            await gw.chain.settle()  # L2's write happens in the background
            l1_hit = await gw.chat(chat_body(QUESTION))
            await gw.chain.layers[0].clear()
            l2_hit = await gw.chat(chat_body(QUESTION))
            l3_hit = await gw.chat(chat_body(PARAPHRASE))
            layers = [r.headers.get("x-strata-layer") for r in (miss, l1_hit, l2_hit, l3_hit)]
            assert layers == [None, "l1", "l2", "l3"]
            prompt, completion = usage_of(miss)
            assert prompt > 0
            assert completion > 0

            lookups = "strata_cache_lookup_duration_seconds_count"
            # l1: all four requests; l2: all but the L1 hit; l3: the two that missed L1 and L2.
            assert sample(gw, lookups, layer="l1") == 4
            assert sample(gw, lookups, layer="l2") == 3
            assert sample(gw, lookups, layer="l3") == 2
            for layer in ("l1", "l2", "l3"):
                assert sample(gw, "strata_cache_lookup_duration_seconds_sum", layer=layer) > 0
                inf = sample(gw, "strata_cache_lookup_duration_seconds_bucket", layer=layer,
                             le="+Inf")  # fmt: skip
                assert inf == sample(gw, lookups, layer=layer)

            saved = "strata_tokens_saved_total"
            for layer in ("l1", "l2", "l3"):
                assert sample(gw, saved, layer=layer, kind="prompt") == prompt
                assert sample(gw, saved, layer=layer, kind="completion") == completion
            assert sample(gw, saved, layer="coalesced", kind="prompt") == 0

            assert sample(gw, "strata_semantic_hit_similarity_count") == 1
            assert sample(gw, "strata_semantic_hit_similarity_sum") == pytest.approx(1.0, abs=1e-3)
            assert sample(gw, "strata_semantic_hit_similarity_bucket", le="0.975") == 0
            assert sample(gw, "strata_cache_lookups_total", layer="l3", result="hit") == 1
            assert sample(gw, "strata_cache_lookups_total", layer="l3", result="miss") == 1

            stats = (await gw.client.get("/admin/cache/stats")).json()
    finally:
        await l3.aclose()
    by_layer = {layer["layer"]: layer for layer in stats["layers"]}
    assert list(by_layer) == ["l1", "l2", "l3"]
    # l1: 1 hit in 4 lookups; l2: 1 in 3; l3: 1 in 2.
    assert by_layer["l1"]["hit_ratio"] == pytest.approx(1 / 4)
    assert by_layer["l2"]["hit_ratio"] == pytest.approx(1 / 3)
    assert by_layer["l3"]["hit_ratio"] == pytest.approx(1 / 2)
    assert by_layer["l3"]["entries"] == 1
    for layer in by_layer.values():
        assert layer["tokens_saved"] == {"prompt": prompt, "completion": completion}
    assert stats["coalesced"] == {"answers": 0, "tokens_saved": {"prompt": 0, "completion": 0}}


async def test_a_layer_without_lookups_has_no_hit_ratio() -> None:
    async with gateway() as gw:
        stats = (await gw.client.get("/admin/cache/stats")).json()
    assert [layer["hit_ratio"] for layer in stats["layers"]] == [None, None]
    assert all(layer["tokens_saved"] == {"prompt": 0, "completion": 0} for layer in stats["layers"])


async def test_coalesced_answers_count_the_tokens_they_saved() -> None:
    engine = FakeEngine(model=MODEL, delay=0.2)
    async with gateway(engine=engine) as gw:
        replies = await asyncio.gather(*(gw.chat() for _ in range(5)))
        leader = next(r for r in replies if r.headers["x-strata-cache"] == "miss")
        prompt, completion = usage_of(leader)
        saved = "strata_tokens_saved_total"
        assert gw.engine_calls() == 1
        assert sample(gw, saved, layer="coalesced", kind="prompt") == 4 * prompt
        assert sample(gw, saved, layer="coalesced", kind="completion") == 4 * completion
        stats = (await gw.client.get("/admin/cache/stats")).json()
    assert stats["coalesced"]["answers"] == 4
    assert stats["coalesced"]["tokens_saved"] == {
        "prompt": 4 * prompt,
        "completion": 4 * completion,
    }


async def test_streamed_misses_record_the_engines_time_to_first_token() -> None:
    async with gateway(streaming=True) as gw:
        stored = await gw.chat(chat_body(stream=True))  # cacheable: teed and stored
        relayed = await gw.chat(chat_body(stream=True), headers={"cache-control": "no-store"})
        replayed = await gw.chat(chat_body(stream=True))  # a hit: no engine, no first token
        plain = await gw.chat(chat_body("a plain one"))  # not streamed
        outcomes = [r.headers["x-strata-cache"] for r in (stored, relayed, replayed, plain)]
        assert outcomes == ["miss", "bypass", "hit", "miss"]
        ttft = "strata_engine_time_to_first_token_seconds"
        assert sample(gw, f"{ttft}_count", route="chat") == 2
        assert sample(gw, f"{ttft}_sum", route="chat") > 0
        assert sample(gw, f"{ttft}_count", route="completions") == 0


async def test_every_strata_metric_is_documented() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text("utf-8")
    async with semantic_gateway() as gw:
        await gw.chat()
        await gw.client.get("/metrics")
        families = [f for f in gw.registry.collect() if f.name.startswith("strata_")]
    assert len(families) >= 20
    names = {f.name + "_total" if f.type == "counter" else f.name for f in families}
    assert sorted(name for name in names if f"`{name}`" not in docs) == []
