"""LiteLLM's proxy with its Redis response cache, as a peer in the benchmarks.

Guarantees:
- `ensure_installed()` creates `.bench/litellm-venv` and installs the pinned `litellm[proxy]`
  there (once: a stamp file records the pin; a different pin reinstalls); nothing of LiteLLM goes
  into Strata's own virtualenv;
- `write_config()` writes a proxy config that routes the benchmark's model to an
  OpenAI-compatible engine (`openai/<model>` with `api_base`) with `cache: true` and
  `cache_params: {type: redis, ...}` under a namespace of its own, so its keys can be deleted;
- `command()` / `environment()` start one worker (`--num_workers 1`, uvicorn with uvloop, as
  LiteLLM picks) without a master key, without telemetry, with its cost map read locally (the
  machine may be offline) and its logs at ERROR (no access log, as for Strata);
- a cache hit is recognised by the `x-litellm-cache-key` response header, which LiteLLM sets only
  when it answered from its cache (checked against the engine's call count by the benchmarks).

Why 1.106.2: the newest releases on PyPI when this was written (1.108.x, 1.109.x) require a
`certifi` newer than any published, so pip cannot install them; 1.106.2 is the newest that pip
resolves here. Override with `STRATA_BENCH_LITELLM_SPEC`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".bench" / "litellm-venv"
PINNED = "litellm[proxy]==1.106.2"
CACHE_HIT_HEADER = "x-litellm-cache-key"


class PeerUnavailable(RuntimeError):
    """The peer could not be installed or started here; the message says what failed."""


def spec() -> str:
    return os.environ.get("STRATA_BENCH_LITELLM_SPEC", PINNED)


def executable() -> Path:
    return VENV / "bin" / "litellm"


def ensure_installed(log=print) -> str:
    """Install the pinned LiteLLM into its own virtualenv unless it is there; its version."""
    wanted = spec()
    stamp = VENV / ".installed-spec"
    if executable().exists() and stamp.exists() and stamp.read_text().strip() == wanted:
        return installed_version()
    log(f"installing {wanted} into {VENV} (once; a few minutes)")
    python = VENV / "bin" / "python"
    steps = []
    if not python.exists():
        steps.append([sys.executable, "-m", "venv", str(VENV)])
    steps.append([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                  wanted])  # fmt: skip
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True, check=False, timeout=1800)
        if result.returncode != 0:
            lines = [
                line
                for line in (result.stderr + result.stdout).splitlines()
                if not line.startswith("WARNING: Location")
            ]
            raise PeerUnavailable(
                f"`{' '.join(step)}` failed (exit {result.returncode}):\n" + "\n".join(lines[-15:])
            )
    stamp.write_text(wanted + "\n")
    return installed_version()


def installed_version() -> str:
    python = VENV / "bin" / "python"
    probe = "import importlib.metadata as m; print(m.version('litellm'))"
    result = subprocess.run(
        [str(python), "-c", probe], capture_output=True, text=True, check=False, timeout=60
    )
    if result.returncode != 0:
        raise PeerUnavailable(f"litellm is not importable in {VENV}: {result.stderr[-500:]}")
    return result.stdout.strip()


def write_config(
    path: Path, *, model: str, engine_url: str, redis_url: str, namespace: str
) -> Path:
    """A proxy config: `model` served by the OpenAI-compatible engine, responses cached in Redis.

    JSON is YAML, so the file is written with `json` (no YAML writer needed here)."""
    redis = urlparse(redis_url)
    config = {
        "model_list": [
            {
                "model_name": model,
                "litellm_params": {
                    "model": f"openai/{model}",
                    "api_base": engine_url.rstrip("/") + "/v1",
                    "api_key": "unused",
                },
            }
        ],
        "litellm_settings": {
            "cache": True,
            "cache_params": {
                "type": "redis",
                "host": redis.hostname or "127.0.0.1",
                "port": redis.port or 6379,
                "namespace": namespace,
            },
            "telemetry": False,
        },
    }
    path.write_text(json.dumps(config, indent=2))
    return path


def command(config: Path, *, host: str, port: int) -> list[str]:
    return [str(executable()), "--config", str(config), "--host", host, "--port", str(port),
            "--num_workers", "1"]  # fmt: skip


def environment(base: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in base.items() if not k.startswith(("STRATA_", "PYTHONPATH"))}
    env.update(
        LITELLM_LOG="ERROR",
        LITELLM_LOCAL_MODEL_COST_MAP="True",  # do not fetch the cost map from GitHub at start
        LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY="true",  # no auth, like Strata here
        LITELLM_TELEMETRY="False",
        DISABLE_ADMIN_UI="True",
    )
    return env


def redis_keys_pattern(namespace: str) -> str:
    return f"{namespace}:*"
