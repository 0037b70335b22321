"""Two `strata serve` processes configured with a `redis+cluster://` URL in their environment
share L2 through the private Redis Cluster. (The failover under load, and L3 across replicas,
are `tests.faults.test_redis_cluster_failover`'s.)"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
import redis

from tests.e2e.procs import Process, fake_engine, gateway_process, running
from tests.rediscluster import RedisCluster

pytestmark = pytest.mark.e2e

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def engine() -> Iterator[Process]:
    with fake_engine("--answer-bytes", "200") as proc:
        yield proc


def ask(gw: Process) -> httpx.Response:
    body = {"model": "strata-fake", "temperature": 0,
            "messages": [{"role": "user", "content": QUESTION}]}  # fmt: skip
    response = httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response


def stored_entries(cluster: RedisCluster, prefix: str) -> int:
    total = 0
    for node in cluster.alive:
        with redis.Redis(port=node.port, socket_timeout=2) as client:
            if client.info("replication")["role"] == "master":
                total += sum(1 for _ in client.scan_iter(match=f"{prefix}:x:*"))
    return total


def test_an_answer_stored_through_one_process_is_an_l2_hit_on_the_other(
    engine: Process, redis_cluster: RedisCluster
) -> None:
    redis_cluster.flush()
    prefix = f"e2e-{uuid.uuid4().hex[:8]}"
    a = gateway_process(engine.url, redis_cluster.url, prefix, l1_max_entries="0")
    b = gateway_process(engine.url, redis_cluster.url, prefix, l1_max_entries="0")
    with running(a), running(b):
        ready = httpx.get(b.url + "/readyz", timeout=5).json()
        assert ready["checks"]["redis"] == "up"
        stored = ask(a)
        assert stored.headers["x-strata-cache"] == "miss"
        deadline = time.monotonic() + 5
        while stored_entries(redis_cluster, prefix) == 0:  # A writes L2 in the background
            assert time.monotonic() < deadline, "A never stored its answer in the cluster"
            time.sleep(0.05)
        served = ask(b)
        assert (served.headers["x-strata-cache"], served.headers["x-strata-layer"]) == ("hit", "l2")
        assert served.content == stored.content
        stats = httpx.get(b.url + "/admin/cache/stats", timeout=5).json()
        l2 = next(layer for layer in stats["layers"] if layer["layer"] == "l2")
        assert l2["entries"] == 1
