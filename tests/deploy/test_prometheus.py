"""The Prometheus config and alert rules pass promtool (config, rules, and the rules' unit tests),
and every Strata metric the dashboard and the alerts query is one the gateway exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.gateway.harness import gateway

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "strata.json"
PROMTOOL = shutil.which("promtool")
METRIC = re.compile(r"\b(strata_[a-z_]+)")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if PROMTOOL is None:
        pytest.fail("promtool is not installed; run `make test`, which installs it")
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=PROMETHEUS, check=False
    )


def test_prometheus_config_is_valid() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_are_valid_and_fire_when_they_should() -> None:
    checked = promtool("check", "rules", "alerts.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", "alerts_test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr


def queried_metrics() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    exprs += [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    return {name for expr in exprs for name in METRIC.findall(expr)}


async def test_every_queried_strata_metric_is_exported() -> None:
    async with gateway() as gw:
        await gw.chat()
        text = (await gw.client.get("/metrics")).text
    exported = set()
    for line in text.splitlines():
        if line.startswith("strata_"):
            name = line.split("{")[0].split(" ")[0]
            exported.add(name)
            exported.add(re.sub(r"_(bucket|count|sum|created)$", "", name))
    missing = queried_metrics() - exported
    assert not missing, f"queried but not exported: {sorted(missing)}"
