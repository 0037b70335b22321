"""Nearest-neighbour search inside one partition at a time.

Guarantees: vectors are searched only within the partition asked for (one FAISS index per
partition: filtering comes before search, never after a global top-k); a partition uses exact
inner-product search until it holds `hnsw_threshold` vectors, then an HNSW graph; entries can be
removed by id (HNSW cannot delete, so removed rows are skipped and the graph is rebuilt once they
are a quarter of it); expired entries are never returned; past `max_entries` in total the oldest
entries are evicted. Each entry carries a payload that search hands back, so callers keep no
parallel map to go stale. Not thread-safe: the semantic layer calls it from one worker thread.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

Vector = npt.NDArray[np.float32]


def single_threaded_search() -> None:
    """Make FAISS run single-threaded in the calling thread.

    One query at a time gains nothing from OpenMP, and on a small machine its worker threads
    spin against the embedding model's: that is where search latency's long tail came from.
    """
    faiss.omp_set_num_threads(1)


@dataclass(slots=True)
class _Partition:
    dimension: int
    hnsw_threshold: int
    hnsw_m: int
    ef_search: int
    index: faiss.Index = field(init=False)
    rows: dict[int, str] = field(default_factory=dict)  # faiss id -> entry id
    vectors: dict[int, Vector] = field(default_factory=dict)
    dead: set[int] = field(default_factory=set)
    hnsw: bool = False

    def __post_init__(self) -> None:
        self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dimension))

    def __len__(self) -> int:
        return len(self.rows) - len(self.dead)

    def add(self, row: int, entry_id: str, vector: Vector) -> None:
        self.rows[row] = entry_id
        self.vectors[row] = vector
        self.index.add_with_ids(vector.reshape(1, -1), np.array([row], dtype=np.int64))
        if not self.hnsw and len(self) >= self.hnsw_threshold:
            self._rebuild(hnsw=True)

    def remove(self, row: int) -> None:
        if row not in self.rows:
            return
        if self.hnsw:
            self.dead.add(row)
            if len(self.dead) * 4 > len(self.rows):
                self._rebuild(hnsw=True)
        else:
            # faiss's Python wrapper takes an id array here; its stubs only know IDSelector.
            self.index.remove_ids(np.array([row], dtype=np.int64))  # type: ignore[arg-type]
            del self.rows[row]
            del self.vectors[row]

    def _rebuild(self, *, hnsw: bool) -> None:
        for row in self.dead:
            self.rows.pop(row, None)
            self.vectors.pop(row, None)
        self.dead.clear()
        if hnsw:
            graph = faiss.IndexHNSWFlat(self.dimension, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            graph.hnsw.efSearch = self.ef_search
            index: faiss.Index = faiss.IndexIDMap2(graph)
        else:
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dimension))
        if self.rows:
            ids = np.fromiter(self.rows, dtype=np.int64, count=len(self.rows))
            index.add_with_ids(np.stack([self.vectors[int(i)] for i in ids]), ids)
        self.index, self.hnsw = index, hnsw

    def search(self, vector: Vector, k: int) -> list[tuple[int, float]]:
        if not self.rows:
            return []
        wanted = min(k + len(self.dead), len(self.rows))
        scores, ids = self.index.search(vector.reshape(1, -1), wanted)
        return [
            (int(row), float(score))
            for score, row in zip(scores[0], ids[0], strict=True)
            if row >= 0 and int(row) not in self.dead
        ][:k]


@dataclass(frozen=True, slots=True)
class Match:
    entry_id: str
    similarity: float
    payload: Any


class VectorIndex:
    def __init__(
        self,
        dimension: int,
        *,
        max_entries: int = 100_000,
        hnsw_threshold: int = 20_000,
        hnsw_m: int = 32,
        ef_search: int = 64,
        clock: Callable[[], float],
    ) -> None:
        self.dimension = dimension
        self._max_entries = max_entries
        self._hnsw_threshold = hnsw_threshold
        self._hnsw_m = hnsw_m
        self._ef_search = ef_search
        self._clock = clock
        self._partitions: dict[str, _Partition] = {}
        # entry id -> (partition, faiss row, expires_at, payload), oldest first.
        self._entries: OrderedDict[str, tuple[str, int, float, Any]] = OrderedDict()
        self._next_row = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, entry_id: str) -> bool:
        return entry_id in self._entries

    def ids(self) -> list[str]:
        return list(self._entries)

    def partition_size(self, partition: str) -> int:
        found = self._partitions.get(partition)
        return len(found) if found is not None else 0

    def add(
        self,
        entry_id: str,
        partition: str,
        vector: Vector,
        expires_at: float,
        payload: Any = None,
    ) -> None:
        if vector.shape != (self.dimension,):
            raise ValueError(f"vector of shape {vector.shape}, expected ({self.dimension},)")
        self.remove(entry_id)
        part = self._partitions.get(partition)
        if part is None:
            part = self._partitions[partition] = _Partition(
                self.dimension, self._hnsw_threshold, self._hnsw_m, self._ef_search
            )
        row = self._next_row
        self._next_row += 1
        part.add(row, entry_id, np.ascontiguousarray(vector, dtype=np.float32))
        self._entries[entry_id] = (partition, row, expires_at, payload)
        while len(self._entries) > self._max_entries:
            oldest = next(iter(self._entries))
            self.remove(oldest)

    def remove(self, entry_id: str) -> bool:
        found = self._entries.pop(entry_id, None)
        if found is None:
            return False
        partition, row, _, _ = found
        part = self._partitions[partition]
        part.remove(row)
        if not len(part):
            del self._partitions[partition]
        return True

    def search(self, partition: str, vector: Vector, *, k: int = 4) -> list[Match]:
        """Up to `k` live entries of `partition`, most similar first."""
        part = self._partitions.get(partition)
        if part is None:
            return []
        now = self._clock()
        matches = []
        expired = []
        for row, score in part.search(np.ascontiguousarray(vector, dtype=np.float32), k):
            entry_id = part.rows[row]
            _, _, expires_at, payload = self._entries[entry_id]
            if expires_at <= now:
                expired.append(entry_id)
                continue
            matches.append(Match(entry_id, score, payload))
        for entry_id in expired:
            self.remove(entry_id)
        return matches
