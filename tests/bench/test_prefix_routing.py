"""The prefix-routing benchmark's workload and parsing: what its numbers are computed from."""

from __future__ import annotations

import pytest

from bench.prefix_routing import parse_gateway, parse_vllm, system_prompt, workload
from engine.routing import affinity_key


def test_each_app_has_its_own_prompt_with_a_key_of_its_own() -> None:
    prompts = [system_prompt(app) for app in range(8)]
    assert len({p.split()[0] for p in prompts}) == 8  # different from the first word
    assert all(1800 < len(p) < 2800 for p in prompts)  # ~500 tokens of English
    keys = set()
    for app in range(8):
        body = workload(1, app, 8)[0][1]
        body["messages"][0]["content"] = prompts[app]
        keys.add(affinity_key("chat", body, block_chars=64, max_blocks=16))
    assert len(keys) == 8


def test_the_workload_is_seeded_and_never_repeats_a_question() -> None:
    items = workload(400, seed=9, apps=8)
    assert items == workload(400, seed=9, apps=8)
    assert items != workload(400, seed=10, apps=8)
    questions = [body["messages"][1]["content"] for _, body in items]
    assert len(set(questions)) == len(questions)
    assert {app for app, _ in items} == set(range(8))
    for app, body in items:
        assert body["messages"][0]["content"] == system_prompt(app)


PAGE = """\
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 512.0
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000.0
vllm:prefix_cache_queries_total{engine="1",model_name="m"} 24.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 3.0
strata_engine_replica_in_flight{replica="http://127.0.0.1:8000"} 2.0
strata_engine_replica_in_flight{replica="http://127.0.0.1:8001"} 5.0
"""


def test_vllm_counters_are_summed_over_their_labels() -> None:
    totals = parse_vllm(PAGE)
    assert totals["vllm:prefix_cache_queries_total"] == 1024.0
    assert totals["vllm:prefix_cache_hits_total"] == 512.0
    assert totals["vllm:request_success_total"] == 3.0


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        ("strata_engine_replica_in_flight",
         {"http://127.0.0.1:8000": 2.0, "http://127.0.0.1:8001": 5.0}),
        ("strata_engine_replica_healthy", {}),
    ],
)  # fmt: skip
def test_gateway_samples_by_replica(family: str, expected: dict[str, float]) -> None:
    assert parse_gateway(PAGE, family) == expected
