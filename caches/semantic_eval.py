"""Offline evaluation of the semantic cache's hit decision on labelled question pairs.

Input: a `.jsonl` file of `{"a": str, "b": str, "duplicate": bool}` lines, where `a` is the cached
question, `b` the new query, and `duplicate` says whether `a`'s answer is a correct answer to `b`.
Every pair is treated as the candidate that nearest-neighbour search found, with similarity =
cosine(embed(a), embed(b)). A pair is *accepted* when the cache would serve `a`'s answer for `b`:

* cosine alone (`verifier=None`): similarity >= threshold (default `COSINE_THRESHOLD`);
* with a verifier: similarity >= the verifier's floor, no hard guard firing, and model score >=
  the verifier's threshold (or the `threshold` given).

Reported: precision (share of served answers that were right), recall (share of duplicates
served), false-hit rate (share of non-duplicates served: wrong answers given), and the per-lookup
latency of the query's side of a hit (embedding the query alone + the hit decision), timed pair by
pair on an evenly spaced sample of `latency_pairs` pairs. `EvalReport.render()` ends with one line
of JSON holding every number; `operating_curve` gives the precision/recall/false-hit curve for a
plot. This module needs only numpy: the caller passes the embedder's `embed_many` (vectors and,
for the verifier's token-level stage, token vectors).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from caches.embedder import Embedding, Tokens
from caches.verifier import Verifier

COSINE_THRESHOLD = 0.96
LATENCY_PAIRS = 500

Embed = Callable[[list[str]], list[Embedding]]


@dataclass(frozen=True, slots=True)
class Pair:
    cached: str
    query: str
    duplicate: bool


def load_pairs(path: Path) -> list[Pair]:
    """Read a pairs file; raise ValueError naming the line of a malformed one."""
    pairs: list[Pair] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                pairs.append(Pair(str(row["a"]), str(row["b"]), bool(row["duplicate"])))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{number}: not a pair line ({exc})") from exc
    return pairs


@dataclass(frozen=True, slots=True)
class EvalReport:
    """The outcome of one evaluation run; `render()` for people, its last line for machines."""

    method: str
    threshold: float
    min_similarity: float | None
    pairs: int
    duplicates: int
    accepted: int
    true_hits: int
    false_hits: int
    latency_p50_ms: float
    latency_p99_ms: float
    latency_pairs: int
    rejected_by: dict[str, int]

    @property
    def precision(self) -> float:
        return self.true_hits / self.accepted if self.accepted else 1.0

    @property
    def recall(self) -> float:
        return self.true_hits / self.duplicates if self.duplicates else 0.0

    @property
    def false_hit_rate(self) -> float:
        different = self.pairs - self.duplicates
        return self.false_hits / different if different else 0.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            precision=round(self.precision, 6),
            recall=round(self.recall, 6),
            false_hit_rate=round(self.false_hit_rate, 6),
        )
        return data

    def render(self) -> str:
        floor = "" if self.min_similarity is None else f" (cosine floor {self.min_similarity:g})"
        rows = [
            ("method", f"{self.method}{floor}"),
            ("threshold", f"{self.threshold:g}"),
            ("pairs", f"{self.pairs:,} ({self.duplicates:,} duplicates)"),
            (
                "accepted",
                f"{self.accepted:,} ({self.true_hits:,} right, {self.false_hits:,} wrong)",
            ),
            ("precision", f"{self.precision:.2%}"),
            ("recall", f"{self.recall:.2%}"),
            ("false-hit rate", f"{self.false_hit_rate:.2%}"),
            (
                "lookup latency",
                f"p50 {self.latency_p50_ms:.2f} ms, p99 {self.latency_p99_ms:.2f} ms "
                f"({self.latency_pairs} pairs: embed query + decide)",
            ),
        ]
        if self.rejected_by:
            reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(self.rejected_by.items()))
            rows.append(("rejected by", reasons))
        width = max(len(name) for name, _ in rows)
        lines = [f"{name:<{width}}  {value}" for name, value in rows]
        lines.append(json.dumps(self.to_json(), sort_keys=True))
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class PairScores:
    """Every pair's score under one method; a pair is accepted when score >= the threshold.

    For cosine alone the score is the similarity; for a verifier it is the model probability,
    or -inf where the floor or a hard guard rejects the pair (`reasons` says which).
    """

    scores: npt.NDArray[np.float64]
    duplicate: npt.NDArray[np.bool_]
    similarity: npt.NDArray[np.float64]
    reasons: tuple[str, ...]


def score_pairs(
    pairs: Sequence[Pair],
    cached_vecs: np.ndarray,
    query_vecs: np.ndarray,
    verifier: Verifier | None,
    *,
    cached_tokens: Sequence[Tokens] | None = None,
    query_tokens: Sequence[Tokens] | None = None,
) -> PairScores:
    """Score pairs whose L2-normalised embeddings are given (row i belongs to pairs[i]).

    A verifier with a token-level stage also needs both sides' tokens, in the same order.
    """
    u = np.asarray(cached_vecs, dtype=np.float32)
    v = np.asarray(query_vecs, dtype=np.float32)
    similarity = np.einsum("ij,ij->i", u, v).astype(np.float64)
    duplicate = np.array([p.duplicate for p in pairs], dtype=bool)
    if verifier is None:
        return PairScores(similarity, duplicate, similarity, ("",) * len(pairs))
    reasons = tuple(
        verifier.rejected_by(p.cached, p.query, float(s))
        for p, s in zip(pairs, similarity, strict=True)
    )
    scores = verifier.score_many(
        [p.cached for p in pairs], [p.query for p in pairs], similarity, u, v,
        cached_tokens=cached_tokens, query_tokens=query_tokens,
    )  # fmt: skip
    scores[np.array([bool(r) for r in reasons], dtype=bool)] = -np.inf
    return PairScores(scores, duplicate, similarity, reasons)


@dataclass(frozen=True, slots=True)
class CurvePoint:
    threshold: float
    precision: float
    recall: float
    false_hit_rate: float
    accepted: int


def operating_curve(scores: PairScores, points: int = 200) -> list[CurvePoint]:
    """Precision, recall and false-hit rate at `points` thresholds spread over the score quantiles
    of the duplicates (where recall moves), highest threshold first: ready to plot."""
    finite = scores.scores[np.isfinite(scores.scores) & scores.duplicate]
    if finite.size == 0:
        return []
    thresholds = np.unique(np.quantile(finite, np.linspace(0.0, 1.0, points)))[::-1]
    curve = []
    for t in thresholds:
        point = _count(scores, float(t))
        curve.append(
            CurvePoint(
                threshold=float(t),
                precision=point[0],
                recall=point[1],
                false_hit_rate=point[2],
                accepted=point[3],
            )
        )
    return curve


def _count(scores: PairScores, threshold: float) -> tuple[float, float, float, int]:
    accepted = scores.scores >= threshold
    n_accepted = int(accepted.sum())
    true_hits = int((accepted & scores.duplicate).sum())
    duplicates = int(scores.duplicate.sum())
    different = len(scores.duplicate) - duplicates
    return (
        true_hits / n_accepted if n_accepted else 1.0,
        true_hits / duplicates if duplicates else 0.0,
        (n_accepted - true_hits) / different if different else 0.0,
        n_accepted,
    )


def _embed(embed: Embed, texts: list[str]) -> tuple[npt.NDArray[np.float32], list[Tokens | None]]:
    """Embed `texts`: L2-normalised rows (an embedder may or may not have done so), and tokens."""
    embeddings = embed(texts)
    vecs = np.array([e.vector for e in embeddings], dtype=np.float32).reshape(len(texts), -1)
    norms = np.linalg.norm(vecs, axis=-1, keepdims=True)
    normalised: npt.NDArray[np.float32] = (vecs / np.maximum(norms, 1e-12)).astype(np.float32)
    return normalised, [e.tokens for e in embeddings]


def _lookup_latencies(
    *,
    pairs: Sequence[Pair],
    cached_vecs: np.ndarray,
    cached_tokens: Sequence[Tokens | None],
    embed: Embed,
    verifier: Verifier | None,
    threshold: float,
    count: int,
) -> list[float]:
    """Per-pair wall time in ms of embedding the query alone and deciding on the candidate.

    The cached side's tokens are at hand, as they are for entries in L3's token cache.
    """
    if not pairs or count <= 0:
        return []
    picks = np.unique(np.linspace(0, len(pairs) - 1, min(count, len(pairs))).astype(int))
    latencies = []
    for i in picks:
        pair, u = pairs[i], cached_vecs[i]
        start = time.perf_counter()
        vecs, tokens = _embed(embed, [pair.query])
        v = vecs[0]
        similarity = float(np.dot(u, v))
        if verifier is None:
            _ = similarity >= threshold
        else:
            verifier.verify(
                pair.cached, pair.query, similarity, u, v, query_tokens=tokens[0],
                cached_tokens=functools.partial(cached_tokens.__getitem__, i),
            )  # fmt: skip
        latencies.append((time.perf_counter() - start) * 1000.0)
    return latencies


def _all_tokens(tokens: list[Tokens | None]) -> list[Tokens]:
    present = [t for t in tokens if t is not None]
    if len(present) != len(tokens):
        raise ValueError("the verifier reads token vectors: the embedder gave none")
    return present


def evaluate(
    pairs_path: Path,
    *,
    embed: Embed,
    verifier: Verifier | None,
    threshold: float | None,
    latency_pairs: int = LATENCY_PAIRS,
) -> EvalReport:
    """Evaluate cosine alone (`verifier=None`) or a verifier on a pairs file.

    `threshold` overrides the cosine threshold (default 0.96) or the verifier's own threshold.
    `embed` maps a list of texts to one `Embedding` per text (vectors are normalised here too).
    Raises ValueError for a malformed or empty pairs file.
    """
    pairs = load_pairs(pairs_path)
    if not pairs:
        raise ValueError(f"{pairs_path}: no pairs")
    if verifier is not None and threshold is not None:
        verifier = verifier.with_threshold(threshold)
    if verifier is None:
        cut = COSINE_THRESHOLD if threshold is None else threshold
        method, floor = "cosine", None
    else:
        cut, method, floor = verifier.threshold, "verifier", verifier.min_similarity

    texts = sorted({p.cached for p in pairs} | {p.query for p in pairs})
    index = {text: i for i, text in enumerate(texts)}
    vecs, tokens = _embed(embed, texts)
    cached_rows = [index[p.cached] for p in pairs]
    query_rows = [index[p.query] for p in pairs]
    cached_vecs, query_vecs = vecs[cached_rows], vecs[query_rows]
    cached_tokens = [tokens[i] for i in cached_rows]
    query_tokens = [tokens[i] for i in query_rows]
    needs_tokens = verifier is not None and verifier.needs_tokens
    scored = score_pairs(
        pairs, cached_vecs, query_vecs, verifier,
        cached_tokens=_all_tokens(cached_tokens) if needs_tokens else None,
        query_tokens=_all_tokens(query_tokens) if needs_tokens else None,
    )  # fmt: skip

    accepted = scored.scores >= cut
    true_hits = int((accepted & scored.duplicate).sum())
    rejected: dict[str, int] = {}
    for reason, ok in zip(scored.reasons, accepted, strict=True):
        if not ok:
            key = reason or ("score" if verifier is not None else "similarity")
            rejected[key] = rejected.get(key, 0) + 1

    latencies = _lookup_latencies(
        pairs=pairs,
        cached_vecs=cached_vecs,
        cached_tokens=cached_tokens,
        embed=embed,
        verifier=verifier,
        threshold=cut,
        count=latency_pairs,
    )
    p50, p99 = np.percentile(latencies, [50, 99]) if latencies else (0.0, 0.0)
    return EvalReport(
        method=method,
        threshold=cut,
        min_similarity=floor,
        pairs=len(pairs),
        duplicates=int(scored.duplicate.sum()),
        accepted=int(accepted.sum()),
        true_hits=true_hits,
        false_hits=int(accepted.sum()) - true_hits,
        latency_p50_ms=round(float(p50), 4),
        latency_p99_ms=round(float(p99), 4),
        latency_pairs=len(latencies),
        rejected_by=rejected,
    )
