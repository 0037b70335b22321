"""Two gateway processes on one Redis share L3: the real embedding model and verifier."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.procs import Process, fake_engine, gateway_process, running
from tests.redisproc import RedisServer

pytestmark = pytest.mark.e2e

QUESTION = "How do I reset my password?"
PARAPHRASE = "How can I reset my password?"
UNRELATED = "How do I delete my account?"


@pytest.fixture(scope="module")
def engine() -> Iterator[Process]:
    with fake_engine("--answer-bytes", "200") as proc:
        yield proc


def ask(gw: Process, question: str, system: str) -> httpx.Response:
    body = {
        "model": "strata-fake",
        "temperature": 0,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
        ],
    }
    response = httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response


def test_paraphrase_stored_on_one_replica_hits_on_the_other_and_survives_restarts(
    engine: Process, redis_server: RedisServer
) -> None:
    redis_server.start()
    prefix = f"l3-{uuid.uuid4().hex[:8]}"
    system = f"You are the support bot of shop {prefix}."
    a = gateway_process(engine.url, redis_server.url, prefix, semantic="on")
    b = gateway_process(engine.url, redis_server.url, prefix, semantic="on")
    with running(a), running(b):
        stored = ask(a, QUESTION, system)
        assert stored.headers["x-strata-cache"] == "miss"
        time.sleep(1.0)  # the replication budget
        served = ask(b, PARAPHRASE, system)
        assert (served.headers["x-strata-cache"], served.headers["x-strata-layer"]) == ("hit", "l3")
        assert float(served.headers["x-strata-similarity"]) > 0.8
        assert served.content == stored.content
        near_miss = ask(b, UNRELATED, system)
        assert near_miss.headers["x-strata-cache"] == "miss"
    with running(a), running(b):  # both restarted: L1 empty, L3 reloaded from Redis
        again = ask(b, PARAPHRASE, system)
        assert again.headers.get("x-strata-layer") == "l3"
        assert again.content == stored.content
