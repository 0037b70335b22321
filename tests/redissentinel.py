"""A private Sentinel setup for tests: a master, its replica and one sentinel, on loopback ports.

Guarantees: three processes of `tests.redisproc` (loopback only, nothing kept on disk but the
sentinel's own config file); `start()` returns once the replica is in sync and the sentinel
knows it (a sentinel fails over only to a replica it has seen). With one sentinel the quorum is
one: it alone decides that the master is down (after `down_after_ms` of silence) and promotes
the replica. `kill_master()` crashes the master (SIGKILL); `wait_failover()` returns once the
sentinel names the replica as master and the replica says so too. Every wait is bounded;
`close()` stops and removes everything.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import redis
from redis.exceptions import RedisError

from tests.redisproc import Closing, RedisServer, RedisServerError

SERVICE = "strata-test"


def _ask(port: int, call: Callable[[redis.Redis], object]) -> object:
    try:
        with redis.Redis(
            host="127.0.0.1", port=port, socket_timeout=1, socket_connect_timeout=1
        ) as client:
            return call(client)
    except (RedisError, OSError):
        return None


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisSentinel(Closing):
    def __init__(
        self, *, service: str = SERVICE, down_after_ms: int = 1000, timeout: float = 30.0
    ) -> None:
        self.service = service
        self.timeout = timeout
        self.master = RedisServer(args=["--repl-diskless-sync-delay", "0"])
        self.replica = RedisServer(
            args=[
                "--replicaof", "127.0.0.1", str(self.master.port),
                "--repl-diskless-sync-delay", "0",
            ]
        )  # fmt: skip
        config = (
            f"sentinel monitor {service} 127.0.0.1 {self.master.port} 1\n"
            f"sentinel down-after-milliseconds {service} {down_after_ms}\n"
            f"sentinel failover-timeout {service} 10000\n"
        )
        self.sentinel = RedisServer(config=config, args=["--sentinel"])

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel.port}/{self.service}"

    def start(self) -> None:
        try:
            self.master.start()
            self.replica.start()
            self._wait(self._replica_in_sync, "the replica in sync")
            self.sentinel.start()
            self._wait(self._replica_known, "the sentinel knowing the replica")
        except BaseException:
            self.close()
            raise

    def _wait(self, check: Callable[[], bool], what: str, timeout: float | None = None) -> float:
        started = time.monotonic()
        deadline = started + (timeout or self.timeout)
        while time.monotonic() < deadline:
            if check():
                return time.monotonic() - started
            time.sleep(0.02)
        raise RedisServerError(f"the test sentinel setup did not reach {what}")

    def _replica_in_sync(self) -> bool:
        info = _ask(self.replica.port, lambda c: c.info("replication"))
        return isinstance(info, dict) and info.get("master_link_status") == "up"

    def _replica_known(self) -> bool:
        replicas = _ask(
            self.sentinel.port, lambda c: c.execute_command("SENTINEL", "REPLICAS", self.service)
        )
        if not isinstance(replicas, list):
            return False
        for raw in replicas:
            fields = {_text(k): _text(v) for k, v in raw.items()}
            if (
                fields.get("port") == str(self.replica.port)
                and set(fields.get("flags", "").split(",")) == {"slave"}  # linked, not down
                and fields.get("master-link-status") == "ok"
            ):
                return True
        return False

    def master_port(self) -> int | None:
        """The master's port as the sentinel names it to clients now: None while it is down
        (redis-py finds no master then either)."""
        raw = _ask(
            self.sentinel.port,
            lambda c: c.execute_command("SENTINEL", "MASTER", self.service),
        )
        if not isinstance(raw, dict):
            return None
        fields = {_text(k): _text(v) for k, v in raw.items()}
        flags = set(fields.get("flags", "").split(","))
        # What redis-py's Sentinel.discover_master accepts.
        if "master" not in flags or flags & {"s_down", "o_down"}:
            return None
        return int(fields["port"])

    def wait_replicated(self, timeout: float = 10.0) -> float:
        """Seconds until the replica has everything the master has."""

        def copied() -> bool:
            info = _ask(self.master.port, lambda c: c.info("replication"))
            if not isinstance(info, dict) or not isinstance(info.get("slave0"), dict):
                return False
            return bool(info["slave0"].get("offset") == info.get("master_repl_offset"))

        return self._wait(copied, "the replica in step with the master", timeout)

    def kill_master(self) -> None:
        self.master.kill()

    def wait_failover(self, timeout: float = 30.0) -> float:
        """Seconds until the sentinel names the replica master and the replica is one."""

        def promoted() -> bool:
            info = _ask(self.replica.port, lambda c: c.info("replication"))
            role = info.get("role") if isinstance(info, dict) else None
            return self.master_port() == self.replica.port and role == "master"

        return self._wait(promoted, "a failover to the replica", timeout)

    def close(self) -> None:
        for server in (self.sentinel, self.replica, self.master):
            server.close()

    def __enter__(self) -> RedisSentinel:
        self.start()
        return self
