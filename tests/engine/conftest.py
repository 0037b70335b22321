"""The real engine: `strata serve` launching vLLM CPU with the default model, once per session."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.e2e.procs import Process
from tests.redisproc import RedisServer, free_port

ROOT = Path(__file__).resolve().parents[2]
TENANT_KEYS = {"tenant-a": "sk-tenant-a-000001", "tenant-b": "sk-tenant-b-000002"}
MODEL = "smollm2-135m-instruct"


def engine_python() -> str:
    python = os.environ.get("STRATA_TEST_ENGINE_PYTHON") or str(ROOT / ".venv-engine/bin/python")
    if not Path(python).exists():
        pytest.fail(
            f"no vLLM interpreter at {python}: run `make test`, which installs vLLM CPU "
            "(or set STRATA_TEST_ENGINE_PYTHON)",
            pytrace=False,
        )
    return python


@dataclass
class Stack:
    gateway: Process
    engine_url: str
    data_dir: Path

    def vllm_pid(self) -> int:
        pids = re.findall(
            r"vLLM (?:healthy after [\d.]+ s|restarted and healthy) \(pid (\d+)",
            self.gateway.log.read_text(),
        )
        return int(pids[-1])

    def engine_counter(self, name: str) -> float:
        text = httpx.get(self.engine_url + "/metrics", timeout=10).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name + "{") or line.startswith(name + " ")
        )


@pytest.fixture(scope="session")
def vllm_stack(redis_server: RedisServer) -> Iterator[Stack]:
    redis_server.start()
    data_dir = Path(os.environ.get("STRATA_TEST_DATA_DIR", ROOT / ".run"))
    engine_port, gateway_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    env.update(
        STRATA_ENGINE_PYTHON=engine_python(),
        STRATA_DATA_DIR=str(data_dir),
        STRATA_ENGINE_PORT=str(engine_port),
        STRATA_ENGINE_CPU_KV_CACHE_GIB="1",
        STRATA_ENGINE_MAX_MODEL_LEN="4096",
        STRATA_ENGINE_RESTART_MAX_BACKOFF="2",
        STRATA_REDIS_URL=redis_server.url,
        STRATA_REDIS_KEY_PREFIX=f"vllm-e2e-{os.getpid()}",
        STRATA_API_KEYS=json.dumps(TENANT_KEYS),
        STRATA_CACHE_SALT_SECRET="test-salt-secret",
        STRATA_LOG_LEVEL="info",
        STRATA_SEMANTIC="off",  # these tests are about the engine; L3 has its own
    )
    args = [sys.executable, "-m", "gateway", "serve", "--port", str(gateway_port)]
    # Its shutdown stops vLLM (SIGTERM, 15 s grace): give it the time before any SIGKILL.
    gateway = Process("strata-serve", args, env, gateway_port, stop_timeout=40)
    started = time.monotonic()
    gateway.start(timeout=900)  # first start prepares the model and compiles: minutes on 2 cores
    print(f"\n[vllm_stack] strata serve + vLLM ready in {time.monotonic() - started:.0f} s")
    try:
        yield Stack(gateway, f"http://127.0.0.1:{engine_port}", data_dir)
    finally:
        gateway.stop()
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{engine_port}/health", timeout=2)
            pytest.fail("vLLM still answers after strata serve stopped", pytrace=False)
