"""The acceptance tests every cache layer passes: MemoryCache, RedisCache on fakeredis, RedisCache
on a real redis-server and on a real Redis Cluster. A new layer is added to the `layer` fixture
and must pass them unchanged."""

from __future__ import annotations

import dataclasses

import pytest

from caches.base import CachedResponse, CacheKey, CacheLayer
from tests.clock import FakeClock

ROUTE = "/v1/chat/completions"


def key(n: int, *, tenant: str = "t1", model: str = "m1", route: str = ROUTE) -> CacheKey:
    return CacheKey(digest=f"{n:064x}", tenant=tenant, model=model, route=route)


def value(
    clock: FakeClock, body: bytes = b'{"choices":[]}', *, ttl: float = 60.0, tokens: int = 0
) -> CachedResponse:
    return CachedResponse(
        body=body,
        created_at=clock.now,
        expires_at=clock.now + ttl,
        prompt_tokens=tokens,
        completion_tokens=tokens // 2,
    )


class TestCacheLayerContract:
    def test_is_a_cache_layer(self, layer: CacheLayer) -> None:
        assert isinstance(layer, CacheLayer)
        assert layer.name
        assert layer.timeout is None or layer.timeout > 0

    async def test_get_of_missing_key_is_none(self, layer: CacheLayer) -> None:
        assert await layer.get(key(1)) is None

    @pytest.mark.parametrize(
        "body",
        [
            pytest.param(b'{"id":"chatcmpl-1","choices":[{"finish_reason":"stop"}]}', id="json"),
            pytest.param(b"", id="empty"),
            pytest.param(bytes(range(256)), id="binary"),
            pytest.param(b"x" * 300_000, id="large"),
        ],
    )
    async def test_set_then_get_returns_an_equal_value(
        self, layer: CacheLayer, clock: FakeClock, body: bytes
    ) -> None:
        stored = value(clock, body, tokens=42)
        await layer.set(key(1), stored)
        assert await layer.get(key(1)) == stored

    async def test_keys_are_independent(self, layer: CacheLayer, clock: FakeClock) -> None:
        one, two = value(clock, b"one"), value(clock, b"two")
        await layer.set(key(1), one)
        await layer.set(key(2), two)
        assert await layer.get(key(1)) == one
        assert await layer.get(key(2)) == two
        assert await layer.get(key(3)) is None

    async def test_overwrite_replaces_the_value(self, layer: CacheLayer, clock: FakeClock) -> None:
        await layer.set(key(1), value(clock, b"old"))
        clock.advance(1)
        newer = value(clock, b"new", tokens=7)
        await layer.set(key(1), newer)
        assert await layer.get(key(1)) == newer

    async def test_delete(self, layer: CacheLayer, clock: FakeClock) -> None:
        await layer.set(key(1), value(clock))
        await layer.set(key(2), value(clock))
        assert await layer.delete(key(1)) is True
        assert await layer.get(key(1)) is None
        assert await layer.delete(key(1)) is False
        assert await layer.get(key(2)) is not None

    async def test_clear_returns_the_number_removed(
        self, layer: CacheLayer, clock: FakeClock
    ) -> None:
        for n in range(3):
            await layer.set(key(n), value(clock))
        assert await layer.clear() == 3
        for n in range(3):
            assert await layer.get(key(n)) is None
        assert await layer.clear() == 0

    async def test_stats_count_entries_and_bytes(self, layer: CacheLayer, clock: FakeClock) -> None:
        empty = await layer.stats()
        assert (empty.layer, empty.entries, empty.bytes) == (layer.name, 0, 0)
        await layer.set(key(1), value(clock, b"a" * 100))
        await layer.set(key(2), value(clock, b"b" * 50))
        await layer.set(key(2), value(clock, b"c" * 10))  # overwrite: still two entries
        stats = await layer.stats()
        assert stats.layer == layer.name
        assert stats.entries == 2
        # A layer may count its own framing, but never less than the bodies it holds.
        assert stats.bytes is not None
        assert stats.bytes >= 110
        await layer.clear()
        cleared = await layer.stats()
        assert (cleared.entries, cleared.bytes) == (0, 0)

    async def test_expired_value_is_not_returned(self, layer: CacheLayer, clock: FakeClock) -> None:
        stored = value(clock, ttl=10)
        await layer.set(key(1), stored)
        clock.advance(9)
        assert await layer.get(key(1)) == stored
        clock.advance(1)
        assert await layer.get(key(1)) is None

    async def test_value_already_expired_when_set_is_not_returned(
        self, layer: CacheLayer, clock: FakeClock
    ) -> None:
        stale = value(clock, ttl=5)
        clock.advance(6)
        await layer.set(key(1), stale)
        assert await layer.get(key(1)) is None

    @pytest.mark.parametrize(
        "other",
        [
            pytest.param({"tenant": "t2"}, id="tenant"),
            pytest.param({"model": "m2"}, id="model"),
            pytest.param({"route": "/v1/completions"}, id="route"),
        ],
    )
    async def test_same_digest_with_other_key_material_is_a_miss(
        self, layer: CacheLayer, clock: FakeClock, other: dict[str, str]
    ) -> None:
        await layer.set(key(1), value(clock))
        assert await layer.get(dataclasses.replace(key(1), **other)) is None
