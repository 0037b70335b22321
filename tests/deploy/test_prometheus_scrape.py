"""A real Prometheus server scrapes a running gateway; the hit ratio computed in PromQL from what it
scraped is the one the traffic made (the Debian `prometheus` package, installed by `make test`)."""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.e2e.procs import Process, fake_engine, gateway_process, running
from tests.redisproc import RedisServer, free_port

pytestmark = pytest.mark.e2e

PROMETHEUS = shutil.which("prometheus")


@pytest.fixture
def prometheus(tmp_path: Path) -> tuple[Path, int]:
    """A working folder and a port for the server."""
    if PROMETHEUS is None:
        pytest.fail("prometheus is not installed; run `make test`, which installs it")
    return tmp_path, free_port()


def start_prometheus(workdir: Path, port: int, target: str) -> Process:
    config = workdir / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        f"scrape_configs:\n  - job_name: strata\n    static_configs:\n"
        f'      - targets: ["{target}"]\n'
    )
    assert PROMETHEUS is not None
    proc = Process(
        "prometheus",
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        {}, port,
    )  # fmt: skip
    proc.start("/-/ready", timeout=60)
    return proc


def query(port: int, promql: str) -> float | None:
    reply = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": promql}, timeout=5)
    reply.raise_for_status()
    result = reply.json()["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def test_prometheus_reads_the_hit_ratio_the_traffic_made(
    redis_server: RedisServer, prometheus: tuple[Path, int]
) -> None:
    redis_server.start()
    workdir, port = prometheus
    with fake_engine() as engine:
        gw = gateway_process(engine.url, redis_server.url, f"scrape-{uuid.uuid4().hex[:8]}")
        with running(gw):
            target = gw.url.removeprefix("http://")
            scraper = start_prometheus(workdir, port, target)
            try:
                for i in range(10):  # 10 misses, then each asked 3 more times: 30 hits
                    body = {"model": "strata-fake", "temperature": 0,
                            "messages": [{"role": "user", "content": f"question {i}"}]}  # fmt: skip
                    for _ in range(4):
                        reply = httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=30)
                        assert reply.status_code == 200
                ratio = 'sum(strata_requests_total{outcome="hit"}) / sum(strata_requests_total)'
                l1 = (
                    'sum(strata_cache_lookups_total{layer="l1", result="hit"})'
                    ' / sum(strata_cache_lookups_total{layer="l1"})'
                )
                deadline = time.monotonic() + 30
                value = None
                while time.monotonic() < deadline:
                    value = query(port, ratio)
                    if value is not None and abs(value - 0.75) < 1e-9:
                        break
                    time.sleep(0.5)
                assert value == pytest.approx(0.75)
                assert query(port, l1) == pytest.approx(0.75)
                assert query(port, 'up{job="strata"}') == 1
            finally:
                scraper.stop()
