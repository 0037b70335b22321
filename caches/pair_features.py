"""The features the verifier's model sees for one (cached question, query) pair.

Two kinds, both cheap enough for the hit path (~0.1 ms for a pair of ordinary questions):

* scalar features from the text: the cosine, overlaps (words, content words, word bigrams,
  character trigrams, longest matching blocks), lengths and how many words each side has that the
  other lacks, whether the first and last words agree, how many questions each packs in, and
  the guards of `caches.guards.FEATURE_GUARDS` as 0/1 flags;
* the element-wise |u - v| and u * v of the two embeddings (what the pair differs in, what it
  shares), 384 values each for all-MiniLM-L6-v2.

All features are symmetric in the two texts. `FEATURES` names them in the order of a row;
`feature_matrix` builds rows for many pairs at once (what fitting and offline evaluation use) and
`feature_row` one row (what the hit path uses); both give the same numbers.
"""

from __future__ import annotations

import difflib
import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from caches.embedder import Tokens
from caches.guards import FEATURE_GUARDS, GUARDS, content_words, numbers_one_sided, words

EMBEDDING_DIM = 384

SCALAR_FEATURES: tuple[str, ...] = (
    "cosine",
    "word_jaccard",
    "content_jaccard",
    "bigram_jaccard",
    "trigram_jaccard",
    "sequence_ratio",
    "length_ratio",
    "log_words_min",
    "log_words_max",
    "log_unshared_min",
    "log_unshared_max",
    "log_unshared_content_min",
    "log_unshared_content_max",
    "same_first_word",
    "same_last_word",
    "questions_min",
    "questions_max",
    "numbers_one_sided",
    *(f"guard_{name}" for name in FEATURE_GUARDS),
)
VECTOR_FEATURES: tuple[str, ...] = ("abs_diff", "product")
FEATURES: tuple[str, ...] = SCALAR_FEATURES + VECTOR_FEATURES
N_FEATURES = len(SCALAR_FEATURES) + len(VECTOR_FEATURES) * EMBEDDING_DIM

FloatArray = npt.NDArray[np.float32]


def _jaccard(a: set[Any] | frozenset[Any], b: set[Any] | frozenset[Any]) -> float:
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def _trigrams(tokens: tuple[str, ...]) -> set[str]:
    joined = " ".join(tokens)
    return {joined[i : i + 3] for i in range(max(1, len(joined) - 2))}


def scalar_features(cached: str, query: str, similarity: float) -> list[float]:
    """The SCALAR_FEATURES of one pair, in order."""
    a, b = words(cached), words(query)
    a_set, b_set = set(a), set(b)
    a_content, b_content = content_words(cached), content_words(query)
    n_words = sorted((len(a), len(b)))
    unshared = sorted((len(a_set - b_set), len(b_set - a_set)))
    unshared_content = sorted((len(a_content - b_content), len(b_content - a_content)))
    questions = sorted((cached.count("?"), query.count("?")))
    return [
        similarity,
        _jaccard(a_set, b_set),
        _jaccard(a_content, b_content),
        _jaccard(set(itertools.pairwise(a)), set(itertools.pairwise(b))),
        _jaccard(_trigrams(a), _trigrams(b)),
        difflib.SequenceMatcher(None, a, b, autojunk=False).ratio(),
        n_words[0] / n_words[1] if n_words[1] else 1.0,
        math.log1p(n_words[0]),
        math.log1p(n_words[1]),
        math.log1p(unshared[0]),
        math.log1p(unshared[1]),
        math.log1p(unshared_content[0]),
        math.log1p(unshared_content[1]),
        float(a[:1] == b[:1]),
        float(a[-1:] == b[-1:]),
        float(min(questions[0], 3)),
        float(min(questions[1], 3)),
        float(numbers_one_sided(cached, query)),
        *(float(GUARDS[name](cached, query)) for name in FEATURE_GUARDS),
    ]


def vector_features(cached_vecs: FloatArray, query_vecs: FloatArray) -> FloatArray:
    """The VECTOR_FEATURES of one pair (1-d inputs) or of many (2-d, one row per pair)."""
    u = np.asarray(cached_vecs, dtype=np.float32)
    v = np.asarray(query_vecs, dtype=np.float32)
    return np.concatenate([np.abs(u - v), u * v], axis=-1)


def feature_row(
    cached: str, query: str, similarity: float, cached_vec: FloatArray, query_vec: FloatArray
) -> FloatArray:
    """All FEATURES of one pair, shape (N_FEATURES,)."""
    scalars = np.asarray(scalar_features(cached, query, similarity), dtype=np.float32)
    return np.concatenate([scalars, vector_features(cached_vec, query_vec)])


def feature_matrix(
    cached: Sequence[str],
    queries: Sequence[str],
    similarities: npt.NDArray[np.floating[Any]],
    cached_vecs: FloatArray,
    query_vecs: FloatArray,
) -> FloatArray:
    """All FEATURES of many pairs, shape (len(cached), N_FEATURES); row i is pair i."""
    scalars = np.array(
        [
            scalar_features(a, b, float(s))
            for a, b, s in zip(cached, queries, similarities, strict=True)
        ],
        dtype=np.float32,
    ).reshape(len(cached), len(SCALAR_FEATURES))
    return np.concatenate([scalars, vector_features(cached_vecs, query_vecs)], axis=1)


# Token-level: how well each word of one text is matched by some word of the other, reading the
# embedding model's contextual token vectors (BERTScore-like). A question that swaps one term
# ("capital of France" / "capital of Germany") leaves one poorly matched token on each side,
# which a sentence vector averages away.
ALIGNMENT_FEATURES: tuple[str, ...] = (
    "align_min_lo",
    "align_min_hi",
    "align_mean_lo",
    "align_mean_hi",
    "align_f1",
    "align_idf_mean_lo",
    "align_idf_mean_hi",
    "align_below_05_lo",
    "align_below_05_hi",
    "align_below_07_lo",
    "align_below_07_hi",
    "align_idf_missing_lo",
    "align_idf_missing_hi",
    "align_first_cosine",
)


def _unit_rows(vectors: FloatArray) -> FloatArray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    out: FloatArray = (vectors / (norms + 1e-9)).astype(np.float32, copy=False)
    return out


def _sorted_pair(x: float, y: float) -> list[float]:
    return [x, y] if x <= y else [y, x]


def alignment_features(a: Tokens, b: Tokens, idf: FloatArray) -> list[float]:
    """The ALIGNMENT_FEATURES of one pair, in order; `idf` is indexed by token id."""
    if len(a.ids) == 0 or len(b.ids) == 0:
        return [0.0] * len(ALIGNMENT_FEATURES)
    sim = _unit_rows(a.vectors) @ _unit_rows(b.vectors).T
    ra, rb = sim.max(axis=1), sim.max(axis=0)
    wa, wb = idf[a.ids], idf[b.ids]
    mean_a, mean_b = float(ra.mean()), float(rb.mean())
    return [
        *_sorted_pair(float(ra.min()), float(rb.min())),
        *_sorted_pair(mean_a, mean_b),
        2 * mean_a * mean_b / (mean_a + mean_b + 1e-9),
        *_sorted_pair(float((ra * wa).sum() / wa.sum()), float((rb * wb).sum() / wb.sum())),
        *_sorted_pair(float((ra < 0.5).sum()), float((rb < 0.5).sum())),
        *_sorted_pair(float((ra < 0.7).sum()), float((rb < 0.7).sum())),
        *_sorted_pair(float((wa * (1 - ra)).sum()), float((wb * (1 - rb)).sum())),
        float(a.first @ b.first),
    ]
