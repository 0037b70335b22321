"""A histogram cheap enough for the hit path, read by the metrics collector at scrape time.

Guarantees: `observe` is one `bisect` and two increments — no lock, no label lookup, no allocation —
so the flow can record every lookup without touching a `prometheus_client` object; the bucket
bounds are fixed at construction (finite, strictly increasing; `+Inf` is implied) and a value goes
in the first bucket whose bound is >= it, as Prometheus' `le` says; `cumulative` is self-consistent
(its `+Inf` bucket is `count`) whenever it is read. Written and read on the event loop only: it is
not meant to be shared with threads.
"""

from __future__ import annotations

import itertools
import math
from bisect import bisect_left
from collections.abc import Sequence

# Cache lookups: from an in-process dict hit (µs) to a slow Redis or an L3 embedding on a busy CPU.
LOOKUP_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
# Cosine similarity of the L3 hits: coarse near the floor, finer where the operating points are.
SIMILARITY_BUCKETS = (
    0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.825, 0.85, 0.875, 0.9, 0.925, 0.95, 0.975, 1.0
)  # fmt: skip
# Engine time to first token: a warm prefix on a GPU to a long prompt queued on a CPU.
TTFT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0
)  # fmt: skip


class PlainHistogram:
    """Counts per bucket and the sum of the values observed; `count` is derived."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        values = tuple(float(bound) for bound in bounds)
        if not values:
            raise ValueError("a histogram needs at least one bucket bound")
        if not all(math.isfinite(bound) for bound in values):
            raise ValueError(f"bucket bounds must be finite (+Inf is implied): {values}")
        if any(a >= b for a, b in itertools.pairwise(values)):
            raise ValueError(f"bucket bounds must be strictly increasing: {values}")
        self.bounds = values
        # One more than the bounds: the last counts what is above every bound (+Inf).
        self.counts = [0] * (len(values) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, values <= it) per bucket, ending with (+Inf, count): Prometheus' form."""
        total = 0
        buckets = []
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            total += count
            buckets.append((bound, total))
        return buckets
