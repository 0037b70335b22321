"""Tenant B replaying tenant A's cached bodies, exact and paraphrased, streamed and not, never
gets one of A's answers, and no response tells B anything about A's cache."""

from __future__ import annotations

import asyncio

from tests.gateway.harness import chat_body
from tests.gateway.test_semantic_flow import auth, with_l3

# Distinct enough that none is a paraphrase of another (the hashing embedder counts words).
QUESTIONS = [f"how do i reset {i:x}a {i:x}b {i:x}c {i:x}d for my account" for i in range(1000)]


def paraphrase(question: str) -> str:
    words = question.split()
    return " ".join(words[3:] + words[:3])  # same words: cosine 1.0 with the hashing embedder


async def test_1000_requests_from_b_replaying_a_get_no_hit() -> None:
    async with with_l3() as gw:
        for question in QUESTIONS:  # A fills L1, L2 and L3
            reply = await gw.chat(chat_body(question), headers=auth("team-a"))
            assert reply.headers["x-strata-cache"] == "miss"
        a_hit = await gw.chat(chat_body(paraphrase(QUESTIONS[0])), headers=auth("team-a"))
        assert (a_hit.headers["x-strata-cache"], a_hit.headers["x-strata-layer"]) == ("hit", "l3")
        # One variant per question, so that B never has an entry of its own to hit.
        variants = [
            chat_body,
            lambda q: chat_body(paraphrase(q)),
            lambda q: chat_body(q, stream=True),
            lambda q: chat_body(paraphrase(q), stream=True),
        ]
        bodies = [variants[i % 4](q) for i, q in enumerate(QUESTIONS)]
        replies = []
        for start in range(0, len(bodies), 50):
            batch = bodies[start : start + 50]
            replies += await asyncio.gather(*(gw.chat(b, headers=auth("team-b")) for b in batch))
        assert gw.engine_calls() == 2 * len(QUESTIONS)
    assert len(replies) == 1000
    assert all(r.status_code == 200 for r in replies)
    assert {r.headers["x-strata-cache"] for r in replies} == {"miss"}
    for reply in replies:
        assert not {"x-strata-layer", "x-strata-similarity", "age"} & set(reply.headers)
