"""The end-to-end benchmark's workload generator: seeded, labelled truthfully, shaped as asked."""

from __future__ import annotations

import pytest

from bench import workload
from bench.workload import KINDS, generate


def test_the_same_seed_gives_the_same_sequence() -> None:
    assert generate(300, seed=3) == generate(300, seed=3)
    assert generate(300, seed=3) != generate(300, seed=4)


def test_labels_follow_from_what_came_before() -> None:
    texts: set[tuple[str, str]] = set()
    intents: set[tuple[str, str | None]] = set()
    for item in generate(500, seed=1):
        key, intent = (item.app, item.question), (item.app, item.intent)
        if item.kind == "unique":
            assert item.intent is None
            assert key not in texts
        elif key in texts:
            assert item.kind == "repeat"
        elif intent in intents:
            assert item.kind == "paraphrase"
        else:
            assert item.kind == "new"
        texts.add(key)
        if item.intent is not None:
            intents.add(intent)


def test_unique_questions_are_never_repeated() -> None:
    uniques = [i.question for i in generate(2000, seed=5) if i.kind == "unique"]
    assert len(uniques) == len(set(uniques)) > 0


@pytest.mark.parametrize(("unique", "paraphrase"), [(0.0, 0.0), (0.15, 0.25), (0.5, 1.0)])
def test_the_shares_come_out_near_the_parameters(unique: float, paraphrase: float) -> None:
    items = generate(4000, seed=2, unique_share=unique, paraphrase_share=paraphrase)
    shares = workload.describe(items)["shares"]
    assert shares["unique"] == pytest.approx(unique, abs=0.03)
    worded = [i for i in items if i.intent is not None]
    reworded = sum(not i.question.startswith("How do I ") for i in worded) / len(worded)
    assert reworded == pytest.approx(paraphrase, abs=0.03)
    assert set(shares) == set(KINDS)


def test_zipf_makes_the_top_intent_the_most_asked() -> None:
    items = [i for i in generate(3000, seed=7, unique_share=0.0) if i.intent is not None]
    counts: dict[str, int] = {}
    for item in items:
        counts[item.intent or ""] = counts.get(item.intent or "", 0) + 1
    ordered = sorted(counts.values(), reverse=True)
    assert ordered[0] > 5 * ordered[-1]


def test_a_body_is_a_deterministic_chat_request_with_its_apps_system_prompt() -> None:
    item = generate(1, seed=0)[0]
    body = item.body("m", 32)
    assert body["temperature"] == 0
    assert body["max_tokens"] == 32
    system, user = body["messages"]
    assert system["role"] == "system"
    persona = next(a.persona for a in workload.APPS if a.name == item.app)
    assert system["content"].startswith(persona)
    assert user == {"role": "user", "content": item.question}


def test_describe_bounds_what_caches_can_serve() -> None:
    summary = workload.describe(generate(400, seed=8))
    shares = summary["shares"]
    assert summary["exact_cache_bound"] == shares["repeat"]
    assert summary["semantic_cache_bound"] == pytest.approx(shares["repeat"] + shares["paraphrase"])
    assert sum(summary["kinds"].values()) == 400


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="shares"):
        generate(10, unique_share=1.5)
