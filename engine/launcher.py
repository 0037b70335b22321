"""Launching and watching a colocated vLLM OpenAI server.

Guarantees:
- vLLM runs as `python -m vllm.entrypoints.openai.api_server` in its own process group, always with
  `--enable-prefix-caching` and `--enable-prompt-tokens-details`, plus the settings people tune
  (model, served name, max model len, dtype, block size, GPU memory utilization and the visible
  GPUs on GPU, `VLLM_CPU_KVCACHE_SPACE` and the cores its threads are bound to on CPU) and any
  extra arguments;
- `start()` returns once `/health` answers 200, or raises `EngineLaunchError` within the start
  timeout, with the exit code and the tail of vLLM's log;
- while running, an owned task restarts vLLM if it exits on its own, with exponential backoff and
  jitter (reset once a run has stayed healthy), and counts restarts;
- `stop()` cancels that task and ends the whole process group: SIGTERM, then SIGKILL after a grace
  period. Nothing is left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx

log = logging.getLogger(__name__)

Device = Literal["cpu", "gpu"]

# vLLM CPU picks bfloat16 by default; on these machines (AMD EPYC, no native BF16) its bfloat16
# kernels produce wrong text (measured: SmolLM2 answers "What is the capital of France?" with a
# loop of French words in bfloat16 and "The capital of France is Paris." in float32, which is also
# what transformers gives in both dtypes). So CPU engines default to float32.
CPU_DTYPE = "float32"
LOG_TAIL_BYTES = 4000


class EngineLaunchError(RuntimeError):
    """vLLM could not be started (or restarted) and made healthy."""


@dataclass(frozen=True, slots=True)
class LaunchSpec:
    python: str
    model: str
    served_model_name: str
    device: Device
    host: str = "127.0.0.1"
    port: int = 8000
    max_model_len: int | None = None
    dtype: str | None = None
    block_size: int | None = None
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_gib: int = 2
    extra_args: tuple[str, ...] = ()
    offline: bool = True  # never let vLLM reach for a model hub
    log_path: Path = field(default_factory=lambda: Path("engine.log"))
    # The CPU cores its compute threads are bound to ("0-3,6"; CPU only), and the GPUs it sees
    # ("1"; GPU only): how replicas on one machine get resources of their own (`engine.fleet`).
    cpu_cores: str | None = None
    gpus: str | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def argv(self) -> list[str]:
        args = [
            self.python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model,
            "--served-model-name", self.served_model_name,
            "--host", self.host,
            "--port", str(self.port),
            "--enable-prefix-caching",
            "--enable-prompt-tokens-details",
            "--disable-uvicorn-access-log",
        ]  # fmt: skip
        if self.max_model_len is not None:
            args += ["--max-model-len", str(self.max_model_len)]
        dtype = (
            self.dtype if self.dtype is not None else (CPU_DTYPE if self.device == "cpu" else None)
        )
        if dtype is not None:
            args += ["--dtype", dtype]
        if self.block_size is not None:
            args += ["--block-size", str(self.block_size)]
        if self.device == "gpu":
            args += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        return args + list(self.extra_args)

    def environment(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        if self.device == "cpu":
            env["VLLM_CPU_KVCACHE_SPACE"] = str(self.cpu_kv_cache_gib)
            if self.cpu_cores is not None:
                env["VLLM_CPU_OMP_THREADS_BIND"] = self.cpu_cores
        elif self.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus
        if self.offline:
            env["HF_HUB_OFFLINE"] = "1"
            env["TRANSFORMERS_OFFLINE"] = "1"
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("DO_NOT_TRACK", "1")
        return env


def log_tail(path: Path, limit: int = LOG_TAIL_BYTES) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - limit))
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"


# Run in the child, then replaced by vLLM (`execv`): on Linux, ask the kernel to send it SIGTERM
# when the gateway dies, however it dies (SIGKILL, the OOM killer, a crash during start-up), so
# that no vLLM is left holding the GPU or the port. PR_SET_PDEATHSIG survives exec.
_GUARD = """\
import ctypes, os, signal, sys
parent, argv = int(sys.argv[1]), sys.argv[2:]
if sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the gateway died before the request was in place
        sys.exit(1)
os.execvp(argv[0], argv)
"""


def orphan_guard(argv: list[str]) -> list[str]:
    """`argv`, run so that it ends when this process does (see `_GUARD`)."""
    return [argv[0], "-c", _GUARD, str(os.getpid()), *argv]


class EngineSupervisor:
    """Owns one vLLM process: start, health, restart on exit, stop."""

    def __init__(
        self,
        spec: LaunchSpec,
        *,
        start_timeout: float = 900.0,
        max_backoff: float = 30.0,
        healthy_reset: float = 60.0,
        stop_grace: float = 15.0,
        poll_interval: float = 0.5,
    ) -> None:
        self.spec = spec
        self._start_timeout = start_timeout
        self._max_backoff = max_backoff
        self._healthy_reset = healthy_reset
        self._stop_grace = stop_grace
        self._poll = poll_interval
        self._process: asyncio.subprocess.Process | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False
        self.restarts = 0

    @property
    def url(self) -> str:
        return self.spec.url

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def _spawn(self) -> asyncio.subprocess.Process:
        self.spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.spec.log_path.open("ab") as log_file:
            log_file.write(f"\n=== strata: starting vLLM at {time.ctime()} ===\n".encode())
            log_file.flush()
            return await asyncio.create_subprocess_exec(
                *orphan_guard(self.spec.argv()),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                env=self.spec.environment(),
                start_new_session=True,  # its own process group: stop() ends vLLM's workers too
            )

    async def _wait_healthy(self, process: asyncio.subprocess.Process) -> None:
        deadline = time.monotonic() + self._start_timeout
        async with httpx.AsyncClient(timeout=2.0, trust_env=False) as client:
            while time.monotonic() < deadline:
                if process.returncode is not None:
                    raise EngineLaunchError(
                        f"vLLM exited with code {process.returncode} while starting; "
                        f"log {self.spec.log_path}:\n{log_tail(self.spec.log_path)}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(self.url + "/health")).status_code == 200:
                        return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(process.wait(), self._poll)
        raise EngineLaunchError(
            f"vLLM did not become healthy within {self._start_timeout:.0f} s; "
            f"log {self.spec.log_path}:\n{log_tail(self.spec.log_path)}"
        )

    async def _start_once(self) -> None:
        process = await self._spawn()
        self._process = process
        try:
            await self._wait_healthy(process)
        except BaseException:
            await self._terminate(process)
            raise

    async def start(self) -> None:
        """Start vLLM and wait until it is healthy; then watch it until `stop()`."""
        if self._watch is not None:
            raise RuntimeError("already started")
        self._stopping = False
        log.info("starting vLLM (%s) on %s: %s", self.spec.device, self.url, self.spec.model)
        started = time.monotonic()
        await self._start_once()
        log.info("vLLM healthy after %.1f s (pid %s)", time.monotonic() - started, self.pid)
        self._watch = asyncio.create_task(self._supervise(), name="strata-engine-supervisor")

    def _backoff(self, failures: int) -> float:
        base: float = min(self._max_backoff, 2.0 ** min(failures, 10))
        return float(base * (0.5 + random.random() / 2))  # noqa: S311 - jitter, not security

    async def _supervise(self) -> None:
        failures = 0
        while not self._stopping:
            process = self._process
            if process is None:
                return
            up_since = time.monotonic()
            code = await process.wait()
            if self._stopping:
                return
            if time.monotonic() - up_since >= self._healthy_reset:
                failures = 0
            failures += 1
            delay = self._backoff(failures)
            log.error(
                "vLLM exited with code %s; restarting in %.1f s (attempt %d)", code, delay, failures
            )
            await asyncio.sleep(delay)
            try:
                await self._start_once()
            except EngineLaunchError as exc:
                log.error("vLLM restart failed: %s", str(exc).splitlines()[0])
                continue
            self.restarts += 1
            log.warning(
                "vLLM restarted and healthy (pid %s, %d restarts so far)", self.pid, self.restarts
            )

    async def _terminate(self, process: asyncio.subprocess.Process) -> None:
        if process.returncode is not None:
            return
        for sig, wait in ((signal.SIGTERM, self._stop_grace), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            try:
                await asyncio.wait_for(process.wait(), wait)
            except TimeoutError:
                continue
            return

    async def stop(self) -> None:
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        if self._process is not None:
            await self._terminate(self._process)
            # Workers vLLM forked into its group can outlive the leader's exit.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)
            self._process = None


def detect_device(preference: Literal["auto", "cpu", "gpu"]) -> Device:
    if preference != "auto":
        return preference
    import shutil  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "cpu"
    try:
        result = subprocess.run([smi, "-L"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "cpu"
    return "gpu" if result.returncode == 0 and b"GPU" in result.stdout else "cpu"
