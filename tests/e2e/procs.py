"""Real processes for end-to-end tests: the fake engine and the gateway, on loopback ports.

Every wait is bounded; every process is stopped (SIGTERM, then SIGKILL) when its context exits;
a process that fails to come up raises with the tail of its log.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.redisproc import free_port


class Process:
    def __init__(
        self, name: str, args: list[str], env: dict[str, str], port: int, stop_timeout: float = 10
    ) -> None:
        self.name, self.args, self.env, self.port = name, args, env, port
        self.stop_timeout = stop_timeout
        self.log = Path(tempfile.mkstemp(prefix=f"strata-{name}-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_path: str = "/healthz", timeout: float = 30.0) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.args,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start:\n{self.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + ready_path, timeout=1.0).status_code == 200:
                    return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} not ready within {timeout} s:\n{self.tail()}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    env.update(extra)
    return env


@contextlib.contextmanager
def fake_engine(*args: str) -> Iterator[Process]:
    port = free_port()
    proc = Process(
        "engine", [sys.executable, "-m", "engine.fake", "--port", str(port), *args], _env({}), port
    )
    proc.start("/health")
    try:
        yield proc
    finally:
        proc.stop()


def gateway_process(engine_url: str, redis_url: str, prefix: str, **settings: str) -> Process:
    port = free_port()
    env = _env(
        {
            "STRATA_REDIS_URL": redis_url,
            "STRATA_REDIS_KEY_PREFIX": prefix,
            "STRATA_LOG_LEVEL": "info",
            "STRATA_SEMANTIC": "off",
            **{f"STRATA_{k.upper()}": v for k, v in settings.items()},
        }
    )
    args = [
        sys.executable,
        "-m",
        "gateway",
        "serve",
        "--engine-url",
        engine_url,
        "--port",
        str(port),
    ]
    return Process("gateway", args, env, port)


@contextlib.contextmanager
def running(proc: Process) -> Iterator[Process]:
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
