"""A private `redis-server` process for tests.

Guarantees: the server listens only on 127.0.0.1, on a port nobody else chose, keeps nothing on
disk (`--save "" --appendonly no`, working directory in a temporary folder) and is ready — it has
answered PING — when `start()` returns; every wait is bounded. `stop()` (or `kill()`, a crash) and
`start()` take it down and bring it back on the same port, for tests of a Redis that goes away. A
missing binary or a server that will not start raises `RedisServerError` with the reason and the
server's log.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

REDIS_SERVER = "/usr/bin/redis-server"
INSTALL_HINT = "run `make test`, which installs redis-server before running the tests"


class RedisServerError(RuntimeError):
    """The private redis-server could not be found or started."""


def find_redis_server() -> str:
    """The redis-server binary: /usr/bin/redis-server, else the first one on PATH."""
    if Path(REDIS_SERVER).is_file():
        return REDIS_SERVER
    found = shutil.which("redis-server")
    if found is None:
        raise RedisServerError(
            f"redis-server not found at {REDIS_SERVER} nor on PATH; {INSTALL_HINT}"
        )
    return found


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def ping(port: int, *, timeout: float = 0.5) -> bool:
    """Does a Redis on 127.0.0.1:`port` answer PING? (Plain socket: no event loop needed.)"""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class Closing:
    """Closed when its `with` block ends, however it ends."""

    def close(self) -> None:
        raise NotImplementedError

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class RedisServer(Closing):
    """One redis-server child process on a fixed loopback port."""

    def __init__(
        self,
        *,
        binary: str | None = None,
        port: int | None = None,
        startup_timeout: float = 10.0,
        args: Sequence[str] = (),
        config: str | None = None,
    ) -> None:
        """`args`: more command-line options (cluster mode, `--replicaof`). `config`: the text of
        a config file to start from, written to the working directory (a sentinel needs one it
        can rewrite)."""
        self.binary = binary or find_redis_server()
        self.port = port or free_port()
        self.startup_timeout = startup_timeout
        self.args = list(args)
        self._workdir = Path(tempfile.mkdtemp(prefix="strata-redis-"))
        self._log = self._workdir / "redis.log"
        self._config: Path | None = None
        if config is not None:
            self._config = self._workdir / "redis.conf"
            self._config.write_text(config)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _log_tail(self) -> str:
        try:
            return self._log.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def start(self) -> None:
        """Start the server (no-op if running) and wait until it answers PING."""
        if self.running:
            return
        args = [
            self.binary,
            *([str(self._config)] if self._config is not None else []),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(self._workdir),
            *self.args,
        ]  # fmt: skip
        with self._log.open("ab") as log:
            self._proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                raise RedisServerError(
                    f"redis-server exited at start on port {self.port}:\n{self._log_tail()}"
                )
            if ping(self.port):
                return
            time.sleep(0.02)
        self.stop()
        raise RedisServerError(
            f"redis-server did not answer PING on port {self.port} within "
            f"{self.startup_timeout} s:\n{self._log_tail()}"
        )

    def stop(self) -> None:
        """Stop the server (no-op if stopped); the port stays reserved for `start()`."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def kill(self) -> None:
        """SIGKILL: the server dies at once, as in a crash (no-op if stopped)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)

    def close(self) -> None:
        """Stop the server and remove its working directory."""
        self.stop()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self


def start_redis_server(*, attempts: int = 3) -> RedisServer:
    """A started private server; a few fresh ports are tried in case one was taken meanwhile."""
    last: RedisServerError | None = None
    for _ in range(attempts):
        server = RedisServer()
        try:
            server.start()
        except RedisServerError as exc:
            last = exc
            server.close()
            continue
        return server
    assert last is not None
    raise last


@contextlib.contextmanager
def running_redis_server() -> Iterator[RedisServer]:
    """`with running_redis_server() as server:` — started on entry, stopped and removed on exit."""
    server = start_redis_server()
    try:
        yield server
    finally:
        server.close()
