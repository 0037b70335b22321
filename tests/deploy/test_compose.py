"""The compose file is valid, requires its secrets, and wires the stack the way the docs say."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = shutil.which("docker-compose")
REQUIRED = {
    "STRATA_MODEL": "Qwen/Qwen2.5-1.5B-Instruct",
    "STRATA_ADMIN_KEY": "k",
    "GRAFANA_ADMIN_PASSWORD": "g",
}


def config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    if COMPOSE is None:
        pytest.fail("docker-compose is not installed; run `make test`, which installs it")
    base = {k: v for k, v in os.environ.items() if k not in REQUIRED}
    return subprocess.run(
        [COMPOSE, "-f", str(ROOT / "docker-compose.yml"), "config"],
        capture_output=True, text=True, timeout=60, env={**base, **env}, check=False,
    )  # fmt: skip


def test_compose_config_is_valid_and_resolved() -> None:
    result = config(REQUIRED)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    services = resolved["services"]
    assert set(services) == {"redis", "vllm", "gateway", "prometheus", "grafana"}
    gateway = services["gateway"]
    assert gateway["environment"]["STRATA_ENGINE_URL"] == "http://vllm:8000"
    assert gateway["depends_on"]["vllm"]["condition"] == "service_healthy"
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "--enable-prefix-caching" in services["vllm"]["command"]
    assert "allkeys-lru" in services["redis"]["command"]
    assert all("healthcheck" in services[name] for name in ("redis", "vllm", "prometheus"))
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    # docker-compose 1.x writes volumes short ("source:target:mode"), 2.x long (a mapping).
    mounts = [
        (v["source"], v["target"]) if isinstance(v, dict) else tuple(v.split(":")[:2])
        for v in services["grafana"]["volumes"]
    ]
    assert any(
        source.endswith("deploy/grafana/dashboards") and target == "/var/lib/grafana/dashboards"
        for source, target in mounts
    )


@pytest.mark.parametrize("missing", sorted(REQUIRED))
def test_compose_refuses_to_start_without_required_values(missing: str) -> None:
    result = config({k: v for k, v in REQUIRED.items() if k != missing})
    assert result.returncode != 0
    assert missing in result.stderr


def test_gateway_image_runs_as_non_root() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "\nUSER strata\n" in dockerfile
    assert dockerfile.count("FROM ") == 2
