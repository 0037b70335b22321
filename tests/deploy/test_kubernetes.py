"""The Helm chart (deploy/helm/strata) renders, for each supported shape of its values, manifests
that the Kubernetes API of pinned versions accepts — their OpenAPI schemas, strict, so an unknown
field is an error — and that fit the gateway they deploy: its settings, routes, port and metrics.

Offline: Helm comes from `scripts/ensure-helm.sh` and the schemas ship inside the
`kubernetes-validate` package (both installed by `make test`). The checks are plain functions,
each also shown a broken document to prove it can fail.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from config import Settings
from tests.gateway.harness import gateway

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "strata"
ADAPTER_VALUES = ROOT / "deploy" / "helm" / "prometheus-adapter-values.yaml"
# The chart's floor (Chart.yaml's kubeVersion) and a recent release.
KUBERNETES_VERSIONS = ("1.27.0", "1.33.0")
# Kinds from CRDs: no schema in kubernetes-validate, checked field by field below instead.
CRD_KINDS = {"ServiceMonitor"}
RELEASE, NAMESPACE = "strata", "strata"
SECRET_DATA = [
    "--set", "secrets.create=true",
    "--set", "secrets.data.redisUrl=redis://redis.strata.svc:6379/0",
    "--set", "secrets.data.adminKey=admin-key-for-tests",
    "--set", "secrets.data.cacheSaltSecret=salt-for-tests",
    "--set-json", 'secrets.data.apiKeys={"team-a": "sk-team-a-key"}',
]  # fmt: skip
SCENARIOS: dict[str, list[str]] = {
    "defaults": [],
    "several-engines": ["--set", "vllm.replicas=3", "--set", "vllm.gpus=2"],
    "secret-and-monitor": [*SECRET_DATA, "--set", "gateway.serviceMonitor.enabled=true"],
    "settings": [
        "--set", "gateway.settings.default_ttl=600",
        "--set-json", 'gateway.settings.ttl_rules=[{"name": "faq", "ttl": 60, "model": "q*"}]',
        "--set", "gateway.settings.semantic=off",
    ],
    "external-engine-no-redis-no-hpa": [
        "--set", "vllm.enabled=false",
        "--set-json", 'engines=["http://vllm.elsewhere.svc:8000"]',
        "--set", "redis.enabled=false",
        "--set", "gateway.autoscaling.enabled=false",
        "--set", "secrets.apiKeys=false",
    ],
}  # fmt: skip
SETTING_NAMES = {f"STRATA_{name.upper()}" for name in Settings.model_fields}


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    # `make test` installs Helm next to the interpreter (the venv's bin); else it is on PATH.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    binary = shutil.which("helm", path=path)
    if binary is None:
        pytest.fail("helm is not installed; run `make test`, which installs it")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60, check=False)


@functools.cache
def render(scenario: str) -> tuple[dict[str, Any], ...]:
    """The chart's manifests for one scenario (cached: callers must not change them)."""
    result = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *SCENARIOS[scenario])
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def one(docs: Iterable[dict[str, Any]], kind: str, component: str | None = None) -> dict[str, Any]:
    found = [
        doc
        for doc in docs
        if doc["kind"] == kind
        and component in (None, doc["metadata"]["labels"].get("app.kubernetes.io/component"))
    ]
    assert len(found) == 1, f"{len(found)} {kind} documents for {component}"
    return found[0]


def container(workload: dict[str, Any]) -> dict[str, Any]:
    [only] = workload["spec"]["template"]["spec"]["containers"]
    return only


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


# --- the checks, as plain functions ---


def schema_problems(doc: dict[str, Any], version: str) -> list[str]:
    """Why the API server of `version` would refuse `doc`, by its OpenAPI schema (strict)."""
    where = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{where} at {'.'.join(map(str, exc.path)) or '(root)'}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [f"{where}: {exc.message}"]
    return []


def unpinned_images(docs: Iterable[dict[str, Any]]) -> list[str]:
    """Images without a version tag or digest, or with a moving tag."""
    images = [
        c["image"]
        for doc in docs
        if doc["kind"] in {"Deployment", "StatefulSet"}
        for c in doc["spec"]["template"]["spec"]["containers"]
    ]
    pinned = re.compile(r"^[^@\s]+(:[\w][\w.-]*)?@sha256:[0-9a-f]{64}$|^[^@\s]+:[\w][\w.-]*$")
    return [
        image
        for image in images
        if not pinned.match(image) or image.rsplit(":", 1)[-1] in {"latest", "stable", "main"}
    ]


def gateway_env(docs: Iterable[dict[str, Any]]) -> dict[str, str | None]:
    """The gateway's environment: its ConfigMap's values, and its own env (None: from a Secret)."""
    docs = list(docs)
    pod = container(one(docs, "Deployment", "gateway"))
    env: dict[str, str | None] = {}
    for source in pod.get("envFrom", []):
        config_map = next(
            doc
            for doc in docs
            if doc["kind"] == "ConfigMap"
            and doc["metadata"]["name"] == source["configMapRef"]["name"]
        )
        env.update(config_map["data"])
    for var in pod.get("env", []):
        env[var["name"]] = var.get("value")
    return env


def unknown_settings(env: Iterable[str]) -> set[str]:
    """STRATA_* names the gateway has no setting for (it would ignore them, silently)."""
    return {name for name in env if name.startswith("STRATA_")} - SETTING_NAMES


# --- the chart against the Kubernetes API ---


def test_chart_lints_strictly() -> None:
    result = helm("lint", "--strict", str(CHART))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_manifest_matches_the_kubernetes_schema(scenario: str, version: str) -> None:
    checked = [doc for doc in render(scenario) if doc["kind"] not in CRD_KINDS]
    problems = [problem for doc in checked for problem in schema_problems(doc, version)]
    assert not problems, "\n".join(problems)


def default_deployment() -> dict[str, Any]:
    return copy.deepcopy(one(render("defaults"), "Deployment", "gateway"))


def _typo_in_container(doc: dict[str, Any]) -> None:
    container(doc)["imagePulPolicy"] = container(doc).pop("imagePullPolicy")


def _replicas_as_text(doc: dict[str, Any]) -> None:
    doc["spec"]["replicas"] = "two"


def _container_without_name(doc: dict[str, Any]) -> None:
    del container(doc)["name"]


def _probe_port_as_list(doc: dict[str, Any]) -> None:
    container(doc)["readinessProbe"]["httpGet"]["port"] = [8080]


def _kind_from_nowhere(doc: dict[str, Any]) -> None:
    doc["kind"] = "Deploymnet"


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (_typo_in_container, "'imagePulPolicy' was unexpected"),
        (_replicas_as_text, "not of type 'integer'"),
        (_container_without_name, "'name' is a required property"),
        (_probe_port_as_list, "readinessProbe"),
        (_kind_from_nowhere, "Couldn't find schema for kind Deploymnet"),
    ],
)
def test_the_schema_check_rejects_a_broken_document(breakage: Any, expected: str) -> None:
    doc = default_deployment()
    assert schema_problems(doc, KUBERNETES_VERSIONS[0]) == []
    breakage(doc)
    problems = schema_problems(doc, KUBERNETES_VERSIONS[0])
    assert problems
    assert expected in problems[0]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["--set", "gateway.image.tag=latest"], "/gateway/image/tag"),
        (["--set", "vllm.image.tag="], "/vllm/image/tag"),
        (["--set", "gateway.replicas=0"], "/gateway/replicas"),
        (["--set", "gateway.bogus=1"], "'bogus' not allowed"),
        (["--set", "gateway.settings.redis_url=redis://x"], "set by the chart itself"),
        (["--set", "vllm.enabled=false"], "list the engines' URLs"),
        (["--set", "gateway.autoscaling.minReplicas=20"], "minReplicas exceeds maxReplicas"),
        (["--set", "secrets.create=true"], "set secrets.data."),
    ],
)
def test_the_chart_refuses_bad_values(values: list[str], message: str) -> None:
    result = helm("template", RELEASE, str(CHART), *values)
    assert result.returncode != 0
    assert message in result.stderr


# --- the chart against the gateway it deploys ---


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_strata_variable_is_a_gateway_setting(scenario: str) -> None:
    assert not unknown_settings(gateway_env(render(scenario)))


@pytest.mark.parametrize(
    ("env", "unknown"),
    [
        ({"STRATA_PORT": "8080", "STRATA_REDIS_URL": None}, set()),
        ({"STRATA_PORT": "8080", "STRATA_REDIS_URI": "redis://x"}, {"STRATA_REDIS_URI"}),
        ({"STRATA_CACHE_TTL": "60", "HF_TOKEN": None}, {"STRATA_CACHE_TTL"}),
    ],
)
def test_unknown_settings_are_named(env: dict[str, str | None], unknown: set[str]) -> None:
    assert unknown_settings(env) == unknown


@pytest.mark.parametrize("scenario", ["defaults", "settings", "external-engine-no-redis-no-hpa"])
def test_the_gateway_starts_from_the_rendered_settings(
    scenario: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`Settings` accepts the rendered environment, with the Secret's values filled in."""
    for name in os.environ:
        if name.startswith("STRATA_"):
            monkeypatch.delenv(name)
    secrets = {
        "STRATA_REDIS_URL": "redis://redis.strata.svc:6379/0",
        "STRATA_ADMIN_KEY": "admin-key-for-tests",
        "STRATA_CACHE_SALT_SECRET": "salt-for-tests",
    }
    env = gateway_env(render(scenario))
    for name, value in env.items():
        monkeypatch.setenv(name, value if value is not None else secrets[name])
    if "STRATA_API_KEYS_FILE" in env:
        keys = tmp_path / "api-keys.json"
        keys.write_text(json.dumps({"team-a": "sk-team-a-key"}))
        monkeypatch.setenv("STRATA_API_KEYS_FILE", str(keys))
    settings = Settings()
    assert settings.host == "0.0.0.0"
    assert not settings.launches_engine
    pod = container(one(render(scenario), "Deployment", "gateway"))
    [http] = [port for port in pod["ports"] if port["name"] == "http"]
    assert settings.port == http["containerPort"]


async def test_probe_paths_are_routes_that_answer() -> None:
    pod = container(one(render("defaults"), "Deployment", "gateway"))
    probes = [pod[name]["httpGet"] for name in ("startupProbe", "livenessProbe", "readinessProbe")]
    assert {probe["port"] for probe in probes} == {"http"}
    async with gateway() as gw:
        for probe in probes:
            answer = await gw.client.get(probe["path"])
            assert answer.status_code == 200, probe["path"]


def test_services_reach_the_named_ports() -> None:
    docs = render("secret-and-monitor")
    service = one(docs, "Service", "gateway")
    [port] = service["spec"]["ports"]
    assert port["targetPort"] == "http"
    assert service["spec"]["selector"].items() <= pod_labels(one(docs, "Deployment")).items()
    monitor = one(docs, "ServiceMonitor")
    selected = monitor["spec"]["selector"]["matchLabels"]
    assert selected.items() <= service["metadata"]["labels"].items()
    [endpoint] = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == (port["name"], "/metrics")


async def test_the_autoscaler_scales_on_a_request_rate_the_gateway_exports() -> None:
    docs = render("defaults")
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == one(docs, "Deployment")["metadata"]["name"]
    assert "replicas" not in one(docs, "Deployment")["spec"], "the HPA owns the replica count"
    by_type = {metric["type"]: metric for metric in hpa["spec"]["metrics"]}
    assert by_type["Resource"]["resource"]["name"] == "cpu", "CPU is the fallback"
    wanted = by_type["Pods"]["pods"]["metric"]["name"]

    [rule] = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    assert rule["name"]["as"] == wanted
    series = re.match(r"[a-z_:]+", rule["seriesQuery"])
    assert series is not None
    assert re.fullmatch(rule["name"]["matches"], series.group())
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}

    async with gateway() as gw:
        await gw.chat()
        text = (await gw.client.get("/metrics")).text
    exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}
    assert series.group() in exported


@pytest.mark.parametrize(
    ("scenario", "replicas", "gpus"), [("defaults", 1, 1), ("several-engines", 3, 2)]
)
def test_vllm_runs_on_gpus_with_a_name_per_pod(scenario: str, replicas: int, gpus: int) -> None:
    docs = render(scenario)
    statefulset = one(docs, "StatefulSet", "engine")
    headless = one(docs, "Service", "engine")
    vllm = container(statefulset)
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == gpus
    assert vllm["resources"]["requests"]["nvidia.com/gpu"] == gpus
    assert "--enable-prefix-caching" in vllm["args"]
    assert f"--tensor-parallel-size={gpus}" in vllm["args"]
    assert vllm["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert headless["spec"]["clusterIP"] == "None"
    assert statefulset["spec"]["serviceName"] == headless["metadata"]["name"]
    [port] = [p["containerPort"] for p in vllm["ports"] if p["name"] == "http"]
    name = statefulset["metadata"]["name"]
    expected = [
        f"http://{name}-{i}.{name}.{NAMESPACE}.svc.cluster.local:{port}" for i in range(replicas)
    ]
    env = gateway_env(docs)
    listed = env.get("STRATA_ENGINE_URLS") or env["STRATA_ENGINE_URL"]
    assert listed is not None
    assert listed.split(",") == expected
    # Only the gateway's pods get through to vLLM.
    policy = one(docs, "NetworkPolicy", "engine")["spec"]
    assert policy["podSelector"]["matchLabels"] == pod_labels(statefulset)
    [rule] = policy["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": pod_labels(one(docs, "Deployment"))}}]


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_images_are_pinned(scenario: str) -> None:
    assert unpinned_images(render(scenario)) == []


@pytest.mark.parametrize(
    ("image", "pinned"),
    [
        ("strata-gateway:0.1.0", True),
        ("vllm/vllm-openai:v0.32.0", True),
        ("registry.example:5000/strata-gateway:0.1.0", True),
        ("vllm/vllm-openai@sha256:" + "a" * 64, True),
        ("vllm/vllm-openai", False),
        ("vllm/vllm-openai:latest", False),
        ("registry.example:5000/strata-gateway", False),
        ("vllm/vllm-openai@sha256:abc", False),
    ],
)
def test_unpinned_images_are_named(image: str, pinned: bool) -> None:
    doc = default_deployment()
    container(doc)["image"] = image
    assert unpinned_images([doc]) == ([] if pinned else [image])


def test_the_gateway_pod_is_locked_down() -> None:
    docs = render("defaults")
    deployment = one(docs, "Deployment", "gateway")
    pod = deployment["spec"]["template"]["spec"]
    gateway_container = container(deployment)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    assert gateway_container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert {"requests", "limits"} <= set(gateway_container["resources"])
    budget = one(docs, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels(deployment).items()
    # The only writable places are the volumes it mounts, /tmp and the data dir among them.
    mounts = {m["mountPath"] for m in gateway_container["volumeMounts"]}
    assert {"/tmp", gateway_env(docs)["STRATA_DATA_DIR"]} <= mounts
