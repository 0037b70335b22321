"""A model that cannot be served is a clear error and a non-zero exit, before or from vLLM."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.engine.conftest import engine_python
from tests.redisproc import free_port


def strata(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True, text=True, timeout=timeout, env={**base, **env}, check=False,
    )  # fmt: skip


def test_missing_model_path_fails_before_anything_starts(tmp_path: Path) -> None:
    result = strata(
        "serve", "--port", str(free_port()),
        env={"STRATA_ENGINE_PYTHON": engine_python(), "STRATA_ENGINE_MODEL": "/no/such/model",
             "STRATA_DATA_DIR": str(tmp_path)},
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert "engine model path '/no/such/model' does not exist" in result.stderr


def test_engine_python_without_vllm_is_named(tmp_path: Path) -> None:
    result = strata(
        "serve", env={"STRATA_ENGINE_PYTHON": sys.executable, "STRATA_DATA_DIR": str(tmp_path)},
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "vLLM is not installed for" in result.stderr


@pytest.mark.vllm
def test_folder_vllm_cannot_load_fails_with_vllms_own_words(tmp_path: Path) -> None:
    broken = tmp_path / "not-a-model"
    broken.mkdir()
    (broken / "README").write_text("no config.json here")
    result = strata(
        "serve", "--port", str(free_port()),
        env={"STRATA_ENGINE_PYTHON": engine_python(), "STRATA_ENGINE_MODEL": str(broken),
             "STRATA_ENGINE_PORT": str(free_port()), "STRATA_DATA_DIR": str(tmp_path),
             "STRATA_ENGINE_START_TIMEOUT": "300", "STRATA_REDIS_ENABLED": "false"},
        timeout=400,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "vLLM exited with code" in output
    assert str(broken) in output  # the tail of vLLM's log names what it could not load
