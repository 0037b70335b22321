"""L3: answers to questions that mean the same, inside an identical context, verified.

Guarantees:
- a lookup embeds only the scope's question (through the batcher, off the event loop), searches
  only the scope's partition, and serves a candidate only if it clears the similarity floor AND
  the verifier accepts it; the query's embedding is handed back so a later store does not embed
  again;
- the verifier's token-level stage reads the cached question's token vectors from a bounded LRU
  (filled by stores, which have them for free); only a candidate the verifier cannot settle
  without them and that is not in the LRU is embedded again, in the worker thread;
- index search, verification and every index change run in one worker thread, never on the loop;
- with a store (Redis), entries are written there and followed from there by an owned task, so
  replicas share entries and a restart loses nothing; a failing store is a counted, logged miss
  or skipped write, never a failed request — the follower resyncs with a full load on recovery;
- `aclose()` cancels the follower and the batcher and releases the worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from caches.base import CachedResponse, CacheKey
from caches.embedder import Embedding, EmbeddingBatcher, Tokens
from caches.semantic_scope import SemanticScope
from caches.semantic_store import Event, SemanticEntry, SemanticStore
from caches.vector_index import VectorIndex, single_threaded_search

log = logging.getLogger(__name__)

Vector = npt.NDArray[np.float32]


# Neighbours examined when an answer is reported bad: more than a lookup's candidates, so that
# every entry that could serve the question again is found.
FORGET_CANDIDATES = 32


class Judgement(Protocol):
    @property
    def accept(self) -> bool: ...

    @property
    def score(self) -> float: ...

    @property
    def reason(self) -> str: ...


class Verifier(Protocol):
    def verify(
        self,
        cached: str,
        query: str,
        similarity: float,
        cached_vec: Vector,
        query_vec: Vector,
        *,
        query_tokens: Tokens | None = None,
        cached_tokens: Callable[[], Tokens | None] | None = None,
    ) -> Judgement: ...


@dataclass(frozen=True, slots=True)
class SemanticHit:
    value: CachedResponse
    similarity: float
    entry_id: str


@dataclass(slots=True)
class SemanticCounters:
    hits: int = 0
    misses: int = 0
    rejected: int = 0  # candidates above the floor that the verifier turned down
    errors: int = 0
    stores: int = 0
    store_errors: int = 0
    token_misses: int = 0  # cached questions embedded again for the verifier's token stage


class _TokenCache:
    """A bounded LRU of token vectors by entry id (float16: half the memory, same decisions)."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._entries: OrderedDict[str, Tokens] = OrderedDict()

    def get(self, entry_id: str) -> Tokens | None:
        tokens = self._entries.get(entry_id)
        if tokens is None:
            return None
        self._entries.move_to_end(entry_id)
        return Tokens(tokens.ids, tokens.vectors.astype(np.float32), tokens.first)

    def put(self, entry_id: str, tokens: Tokens) -> None:
        if self._capacity <= 0:
            return
        self._entries[entry_id] = Tokens(
            tokens.ids, tokens.vectors.astype(np.float16), tokens.first
        )
        self._entries.move_to_end(entry_id)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)

    def discard(self, entry_id: str) -> None:
        self._entries.pop(entry_id, None)


class SemanticCache:
    name = "l3"

    def __init__(
        self,
        *,
        batcher: EmbeddingBatcher,
        verifier: Verifier,
        index: VectorIndex,
        store: SemanticStore | None = None,
        min_similarity: float,
        candidates: int = 4,
        token_cache: int = 2048,
        store_timeout: float = 0.05,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._batcher = batcher
        self._verifier = verifier
        self._index = index
        self._store = store
        self._floor = min_similarity
        self._k = candidates
        self._tokens = _TokenCache(token_cache)
        self._store_timeout = store_timeout
        self._clock = clock
        self._pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="strata-l3", initializer=self._prepare_worker
        )
        self._follower: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._store_failing = False
        self.counters = SemanticCounters()

    # --- worker-thread side: the only code that touches the index and the entry map ---

    def _prepare_worker(self) -> None:
        single_threaded_search()
        self._batcher.embedder.prepare_thread()  # it embeds cached questions the LRU lost

    def _apply_add(self, entry: SemanticEntry, tokens: Tokens | None = None) -> None:
        if not entry.value.expired(self._clock()):
            self._index.add(entry.id, entry.partition, entry.vector, entry.value.expires_at, entry)
            if tokens is not None:
                self._tokens.put(entry.id, tokens)

    def _apply_remove(self, entry_id: str) -> None:
        self._index.remove(entry_id)
        self._tokens.discard(entry_id)

    def _tokens_of(self, entry: SemanticEntry) -> Tokens | None:
        tokens = self._tokens.get(entry.id)
        if tokens is None:
            self.counters.token_misses += 1
            tokens = self._batcher.embedder.embed_many([entry.text])[0].tokens
            if tokens is not None:
                self._tokens.put(entry.id, tokens)
        return tokens

    def _verified(
        self, scope: SemanticScope, query: Embedding, k: int
    ) -> Iterator[tuple[SemanticEntry, float, bool]]:
        """The partition's `k` nearest entries above the floor, most similar first, each with
        its similarity and the verifier's verdict."""
        for match in self._index.search(scope.partition, query.vector, k=k):
            if match.similarity < self._floor:
                return
            entry: SemanticEntry = match.payload
            verdict = self._verifier.verify(
                entry.text, scope.text, match.similarity, entry.vector, query.vector,
                query_tokens=query.tokens,
                cached_tokens=functools.partial(self._tokens_of, entry),
            )  # fmt: skip
            yield entry, match.similarity, verdict.accept

    def _search(self, scope: SemanticScope, query: Embedding) -> tuple[SemanticHit | None, int]:
        rejected = 0
        for entry, similarity, accepted in self._verified(scope, query, self._k):
            if accepted:
                return SemanticHit(entry.value, similarity, entry.id), rejected
            rejected += 1
        return None, rejected

    async def _in_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # --- the event-loop side ---

    @property
    def size(self) -> int:
        return len(self._index)

    async def lookup(self, scope: SemanticScope) -> tuple[SemanticHit | None, Embedding | None]:
        try:
            query = await self._batcher.embed(scope.text)
            hit, rejected = await self._in_worker(self._search, scope, query)
        except Exception as exc:
            self.counters.errors += 1
            log.warning("l3 lookup failed (%s: %s); treated as a miss", type(exc).__name__, exc)
            return None, None
        self.counters.rejected += rejected
        if hit is None:
            self.counters.misses += 1
        else:
            self.counters.hits += 1
        return hit, query

    async def store(
        self,
        scope: SemanticScope,
        key: CacheKey,
        value: CachedResponse,
        embedding: Embedding | None,
    ) -> None:
        try:
            if embedding is None:
                embedding = await self._batcher.embed(scope.text)
            entry = SemanticEntry(
                key.digest, scope.partition, scope.text, embedding.vector, key, value
            )
            await self._in_worker(self._apply_add, entry, embedding.tokens)
        except Exception as exc:
            self.counters.store_errors += 1
            log.warning("l3 store failed (%s: %s)", type(exc).__name__, exc)
            return
        self.counters.stores += 1
        if self._store is not None:
            ttl = math.ceil(value.expires_at - self._clock())
            if ttl > 0:
                await self._guarded(self._store.put(entry, ttl))

    def _servable(self, scope: SemanticScope, query: Embedding) -> list[str]:
        """Every entry of the scope's partition the verifier would serve for its question."""
        return [e.id for e, _, ok in self._verified(scope, query, FORGET_CANDIDATES) if ok]

    async def forget(self, scope: SemanticScope, entry_id: str) -> int:
        """Remove entry `entry_id` and every entry that would be served for the scope's question
        (a reported bad answer and its semantic neighbours), here and, through the store, on
        every replica. How many this replica held."""
        query = await self._batcher.embed(scope.text)
        ids = {entry_id, *await self._in_worker(self._servable, scope, query)}
        held = 0
        for found in ids:
            held += found in self._index
            await self.delete(found)
        return held

    async def delete(self, entry_id: str) -> None:
        await self._in_worker(self._apply_remove, entry_id)
        if self._store is not None:
            await self._guarded(self._store.remove(entry_id))

    async def clear(self) -> int:
        count = len(self._index)
        for entry_id in await self._in_worker(self._index.ids):
            await self._in_worker(self._apply_remove, entry_id)
        if self._store is not None:
            # Walks the keyspace: not bounded by the per-operation timeout.
            await self._store.clear()
        return count

    async def _guarded(self, op: Any) -> None:
        try:
            async with asyncio.timeout(self._store_timeout):
                await op
        except Exception as exc:
            self.counters.store_errors += 1
            if not self._store_failing:
                self._store_failing = True
                log.warning("l3 store failing (%s: %s)", type(exc).__name__, exc)
            return
        if self._store_failing:
            self._store_failing = False
            log.warning("l3 store recovered")

    # --- sharing through Redis ---

    async def start(self) -> None:
        """Load every stored entry, then follow new ones in an owned background task."""
        if self._store is None:
            return
        await self._store.ready()
        position = await self._load()
        self._follower = asyncio.create_task(self._follow(position), name="strata-l3-follower")

    async def _load(self) -> str:
        assert self._store is not None
        position = await self._store.position()
        loaded = 0
        async for entry in self._store.load():
            await self._in_worker(self._apply_add, entry)
            loaded += 1
        log.info("l3: loaded %d semantic entries", loaded)
        return position

    async def _apply(self, event: Event) -> None:
        if event.op == "del":
            await self._in_worker(self._apply_remove, event.entry_id)
        elif event.entry is not None and event.entry_id not in self._index:
            await self._in_worker(self._apply_add, event.entry)

    async def _follow(self, start: str) -> None:
        assert self._store is not None
        position, failures = start, 0
        while not self._stop.is_set():
            try:
                async for seen, event in self._store.follow(position, self._stop):
                    position, failures = seen, 0
                    await self._apply(event)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                if failures == 1:
                    log.warning("l3 follower lost Redis (%s); retrying", type(exc).__name__)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), min(5.0, 0.2 * 2**failures))
                if self._stop.is_set():
                    return
                with contextlib.suppress(Exception):
                    # Events may have been missed while away: resync from a full load.
                    position = await self._load()
                    log.warning("l3 follower resynced")

    async def aclose(self) -> None:
        if self._follower is not None:
            assert self._store is not None
            self._stop.set()
            # Cooperative: a cancelled blocking XREAD would wait out its socket timeout instead.
            done, _ = await asyncio.wait([self._follower], timeout=self._store.block_seconds + 2)
            if not done:
                self._follower.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._follower
            self._follower = None
        if self._store is not None:
            await self._store.aclose()
        await self._batcher.aclose()
        self._pool.shutdown(wait=False, cancel_futures=True)
