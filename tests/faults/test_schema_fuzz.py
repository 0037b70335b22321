"""Schemathesis against the gateway's own OpenAPI schema: a real `strata serve` process in front
of the fake engine and a real Redis, at least 500 generated requests, and not one server error.

Hypothesis drives schemathesis's strategies directly (one `@given` per operation): the same
generation as its pytest plugin, without depending on that plugin's pytest internals."""

from __future__ import annotations

import itertools
import uuid
from collections import Counter
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.e2e.procs import fake_engine, gateway_process, running
from tests.redisproc import RedisServer

pytestmark = pytest.mark.e2e

# Per operation and mode. Operations without inputs have one possible request; the two completion
# routes get valid bodies (positive) and invalid ones (negative): well over 500 in all.
EXAMPLES = 150


def test_no_generated_request_is_a_server_error(redis_server: RedisServer) -> None:
    redis_server.start()
    statuses: Counter[int] = Counter()
    server_errors: list[str] = []
    with fake_engine() as engine:
        gw = gateway_process(engine.url, redis_server.url, f"fuzz-{uuid.uuid4().hex[:8]}")
        with running(gw):
            schema = schemathesis.openapi.from_url(gw.url + "/openapi.json")
            operations = [result.ok() for result in schema.get_all_operations()]
            for operation, mode in itertools.product(operations, GenerationMode):
                try:
                    fuzz(operation, mode, statuses, server_errors)
                except Unsatisfiable:
                    assert mode is GenerationMode.NEGATIVE  # nothing to get wrong: no inputs
    print(f"{sum(statuses.values())} requests over {len(operations)} operations: {statuses}")
    assert not server_errors, server_errors[:5]
    assert sum(statuses.values()) >= 500


def fuzz(
    operation: Any, mode: GenerationMode, statuses: Counter[int], server_errors: list[str]
) -> None:
    """Send `EXAMPLES` requests generated for `operation` in `mode`; tally what came back."""
    positive = mode is GenerationMode.POSITIVE

    @settings(
        max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case: schemathesis.Case) -> None:
        if positive and isinstance(case.body, dict):
            # The engine's model, so that valid bodies go all the way: key, engine, store, and
            # the repeats hit.
            case.body["model"] = "strata-fake"
        response = case.call(timeout=30)
        statuses[response.status_code] += 1
        if response.status_code >= 500:
            server_errors.append(f"{case.method} {case.path} {case.body!r:.300}")

    check()
