"""Test doubles for L3: verifiers that only look at cosine similarity."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from caches.embedder import Tokens


@dataclass(frozen=True)
class Verdict:
    accept: bool
    score: float
    reason: str


class CosineVerifier:
    def __init__(self, threshold: float = 0.95) -> None:
        self.threshold = threshold
        self.calls = 0

    def verify(
        self,
        cached: str,
        query: str,
        similarity: float,
        cached_vec: npt.NDArray[np.float32],
        query_vec: npt.NDArray[np.float32],
        *,
        query_tokens: Tokens | None = None,
        cached_tokens: Callable[[], Tokens | None] | None = None,
    ) -> Verdict:
        self.calls += 1
        ok = similarity >= self.threshold
        return Verdict(ok, similarity, "" if ok else "score")


class TokenReadingVerifier(CosineVerifier):
    """Like CosineVerifier, but reads the cached side's tokens as a token-level stage would."""

    def __init__(self, threshold: float = 0.95) -> None:
        super().__init__(threshold)
        self.seen: list[Tokens | None] = []

    def verify(
        self,
        cached: str,
        query: str,
        similarity: float,
        cached_vec: npt.NDArray[np.float32],
        query_vec: npt.NDArray[np.float32],
        *,
        query_tokens: Tokens | None = None,
        cached_tokens: Callable[[], Tokens | None] | None = None,
    ) -> Verdict:
        assert query_tokens is not None
        assert cached_tokens is not None
        self.seen.append(cached_tokens())
        return super().verify(cached, query, similarity, cached_vec, query_vec)
