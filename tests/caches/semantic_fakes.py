"""Test doubles for L3: a verifier that only looks at cosine similarity."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


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
    ) -> Verdict:
        self.calls += 1
        ok = similarity >= self.threshold
        return Verdict(ok, similarity, "" if ok else "score")
