"""Which model the launched engine serves, and getting it ready.

Guarantees: the default model lives at `<data_dir>/models/SmolLM2-135M-Instruct`, prepared by
`engine/prepare.py` run with the engine's interpreter (which has torch and transformers; this one
need not); preparation is idempotent and verified there. A model given as a path must exist; any
other string is taken as a Hugging Face name for vLLM to resolve.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

DEFAULT_MODEL_DIRNAME = "SmolLM2-135M-Instruct"
DEFAULT_SERVED_NAME = "smollm2-135m-instruct"
PREPARE_SCRIPT = Path(__file__).with_name("prepare.py")


class ModelError(RuntimeError):
    """The model to serve is missing or could not be prepared."""


def default_model_dir(data_dir: Path) -> Path:
    return data_dir / "models" / DEFAULT_MODEL_DIRNAME


def looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or Path(model).expanduser().exists()


def check_model(model: str) -> None:
    if looks_like_path(model) and not Path(model).expanduser().exists():
        raise ModelError(f"engine model path {model!r} does not exist")


def has_vllm(python: str) -> bool:
    """Can `python` import vLLM? (Asks for the module spec only: importing vLLM takes seconds.)"""
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    try:
        return subprocess.run([python, "-c", probe], timeout=60, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def prepare_default_model(python: str, dest: Path, *, force: bool = False) -> Path:
    """Build (or verify) the default model folder with the engine's interpreter."""
    args = [python, str(PREPARE_SCRIPT), "--dest", str(dest)]
    if force:
        args.append("--force")
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=1800, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelError(f"preparing the default model failed: {exc}") from exc
    if result.returncode != 0:
        tail = (result.stderr or result.stdout)[-3000:]
        raise ModelError(f"preparing the default model failed (exit {result.returncode}):\n{tail}")
    return dest
