"""L3 with a hashing embedder and a cosine verifier: hits, partitions, sharing through Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import numpy as np
import pytest

from caches.base import CachedResponse, CacheKey
from caches.embedder import EmbeddingBatcher, HashingEmbedder
from caches.redis_cache import connect
from caches.semantic import SemanticCache
from caches.semantic_scope import SemanticScope
from caches.semantic_store import SemanticStore
from caches.vector_index import VectorIndex
from tests.caches.semantic_fakes import CosineVerifier, TokenReadingVerifier
from tests.clock import FakeClock
from tests.polling import eventually
from tests.redisproc import RedisServer

DIM = 64


def answer(clock: FakeClock, text: str = "Use the reset link.") -> CachedResponse:
    return CachedResponse(
        body=b'{"choices":[{"message":{"content":"' + text.encode() + b'"}}]}',
        created_at=clock.now,
        expires_at=clock.now + 600,
    )


def key(n: int) -> CacheKey:
    return CacheKey(digest=f"{n:064x}", tenant="t", model="m", route="chat")


Factory = Callable[..., SemanticCache]


@pytest.fixture
async def factory(clock: FakeClock) -> AsyncIterator[Factory]:
    made: list[SemanticCache] = []

    def make(
        store: SemanticStore | None = None,
        verifier: CosineVerifier | None = None,
        token_cache: int = 2048,
    ) -> SemanticCache:
        cache = SemanticCache(
            token_cache=token_cache,
            batcher=EmbeddingBatcher(HashingEmbedder(DIM)),
            verifier=verifier or CosineVerifier(0.95),
            index=VectorIndex(DIM, clock=clock),
            store=store,
            min_similarity=0.5,
            store_timeout=1.0,
            clock=clock,
        )
        made.append(cache)
        return cache

    yield make
    for cache in made:
        await cache.aclose()


async def test_paraphrase_in_the_same_partition_is_a_hit(
    factory: Factory, clock: FakeClock
) -> None:
    cache = factory()
    stored_scope = SemanticScope("p", "how do i reset my password")
    await cache.store(stored_scope, key(1), answer(clock), None)
    hit, embedding = await cache.lookup(SemanticScope("p", "my password how do i reset"))
    assert hit is not None
    assert hit.entry_id == key(1).digest
    assert hit.similarity == pytest.approx(1.0, abs=1e-4)
    assert embedding is not None
    assert embedding.vector.shape == (DIM,)
    assert cache.counters.hits == 1


async def test_other_partition_or_other_question_is_a_miss(
    factory: Factory, clock: FakeClock
) -> None:
    cache = factory()
    await cache.store(SemanticScope("p", "how do i reset my password"), key(1), answer(clock), None)
    other_partition, _ = await cache.lookup(SemanticScope("q", "how do i reset my password"))
    other_question, _ = await cache.lookup(SemanticScope("p", "what is the capital of france"))
    assert other_partition is None
    assert other_question is None
    assert cache.counters.misses == 2


async def test_verifier_has_the_last_word(factory: Factory, clock: FakeClock) -> None:
    strict = CosineVerifier(threshold=1.01)  # accepts nothing
    cache = factory(verifier=strict)
    await cache.store(SemanticScope("p", "reset my password"), key(1), answer(clock), None)
    hit, _ = await cache.lookup(SemanticScope("p", "reset my password"))
    assert hit is None
    assert strict.calls == 1
    assert cache.counters.rejected == 1


@pytest.mark.parametrize(("capacity", "embedded_again"), [(2048, 0), (0, 2)])
async def test_cached_tokens_come_from_the_store_or_one_more_embedding(
    factory: Factory, clock: FakeClock, capacity: int, embedded_again: int
) -> None:
    verifier = TokenReadingVerifier()
    cache = factory(verifier=verifier, token_cache=capacity)
    await cache.store(SemanticScope("p", "reset my password"), key(1), answer(clock), None)
    for _ in range(2):
        hit, _ = await cache.lookup(SemanticScope("p", "my password reset"))
        assert hit is not None
    assert cache.counters.token_misses == embedded_again
    expected = HashingEmbedder(DIM).embed_many(["reset my password"])[0].tokens
    assert expected is not None
    for tokens in verifier.seen:
        assert tokens is not None
        np.testing.assert_array_equal(tokens.ids, expected.ids)
        np.testing.assert_array_equal(tokens.vectors, expected.vectors)


async def test_expired_answers_are_not_served(factory: Factory, clock: FakeClock) -> None:
    cache = factory()
    await cache.store(SemanticScope("p", "reset my password"), key(1), answer(clock), None)
    clock.advance(601)
    hit, _ = await cache.lookup(SemanticScope("p", "reset my password"))
    assert hit is None


async def test_delete_and_clear(factory: Factory, clock: FakeClock) -> None:
    cache = factory()
    for n, text in enumerate(["reset my password", "delete my account"]):
        await cache.store(SemanticScope("p", text), key(n), answer(clock), None)
    await cache.delete(key(0).digest)
    assert (await cache.lookup(SemanticScope("p", "reset my password")))[0] is None
    assert await cache.clear() == 1
    assert cache.size == 0


async def test_batcher_coalesces_concurrent_lookups() -> None:
    batcher = EmbeddingBatcher(HashingEmbedder(DIM), max_batch=64, max_wait=0.01)
    try:
        rows = await asyncio.gather(*(batcher.embed(f"question {i}") for i in range(20)))
    finally:
        await batcher.aclose()
    assert len(rows) == 20
    assert batcher.texts == 20
    assert batcher.batches < 20  # gathered, not one encode per request


async def stores(server: RedisServer, prefix: str) -> SemanticStore:
    return SemanticStore(
        connect(server.url, timeout=1.0, max_connections=4),
        connect(server.url, timeout=5.0, max_connections=2),
        prefix=prefix,
        dimension=DIM,
        block_ms=200,
    )


async def test_an_entry_stored_on_one_replica_is_found_on_another_within_a_second(
    factory: Factory, clock: FakeClock, redis_server: RedisServer, redis_client: object
) -> None:
    a = factory(store=await stores(redis_server, "rep"))
    b = factory(store=await stores(redis_server, "rep"))
    await a.start()
    await b.start()
    await a.store(SemanticScope("p", "how do i reset my password"), key(1), answer(clock), None)

    async def on_b() -> bool:
        return (await b.lookup(SemanticScope("p", "reset my password how do i")))[0] is not None

    await eventually(on_b, timeout=1.0)
    await a.delete(key(1).digest)

    async def gone_on_b() -> bool:
        return (await b.lookup(SemanticScope("p", "reset my password how do i")))[0] is None

    await eventually(gone_on_b, timeout=1.0)


async def test_a_restarted_replica_loads_what_was_stored(
    factory: Factory, clock: FakeClock, redis_server: RedisServer, redis_client: object
) -> None:
    first = factory(store=await stores(redis_server, "restart"))
    await first.start()
    await first.store(SemanticScope("p", "delete my account"), key(2), answer(clock), None)
    await first.aclose()
    second = factory(store=await stores(redis_server, "restart"))
    await second.start()
    assert second.size == 1
    hit, _ = await second.lookup(SemanticScope("p", "my account delete"))
    assert hit is not None
    assert hit.value.body == answer(clock).body


async def test_unreadable_records_are_skipped_and_deleted(
    factory: Factory, clock: FakeClock, redis_server: RedisServer, redis_client: object
) -> None:
    await redis_client.set("garbled:s:e:" + "0" * 64, b"\x00not msgpack")  # type: ignore[attr-defined]
    cache = factory(store=await stores(redis_server, "garbled"))
    await cache.start()
    assert cache.size == 0
    assert await redis_client.exists("garbled:s:e:" + "0" * 64) == 0  # type: ignore[attr-defined]


async def test_a_dead_store_is_a_counted_skip_not_an_error(
    factory: Factory, clock: FakeClock
) -> None:
    from tests.redisproc import free_port  # noqa: PLC0415

    dead = f"redis://127.0.0.1:{free_port()}/0"
    store = SemanticStore(
        connect(dead, timeout=0.05, max_connections=2),
        connect(dead, timeout=0.05, max_connections=2),
        prefix="dead",
        dimension=DIM,
    )
    cache = factory(store=store)
    await cache.store(SemanticScope("p", "reset my password"), key(1), answer(clock), None)
    assert cache.counters.store_errors == 1
    hit, _ = await cache.lookup(SemanticScope("p", "reset my password"))
    assert hit is not None  # the local index still serves it
