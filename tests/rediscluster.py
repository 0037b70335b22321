"""A private Redis Cluster for tests: three masters, each with a replica, on loopback ports.

Guarantees: six `redis-server` processes in cluster mode (`tests.redisproc`: loopback only,
nothing kept on disk but each node's `nodes.conf`), joined by `redis-cli --cluster create`;
`start()` returns once every node reports `cluster_state:ok` and knows all six. `kill_master()`
crashes one master (SIGKILL); `wait_promoted()` returns once its replica serves its slots and
the survivors agree the cluster is ok; `wait_replicated()` once every replica has caught up.
Every wait is bounded; `close()` stops and removes every node. Failures raise
`RedisServerError` with what the cluster said.
"""

from __future__ import annotations

import shutil
import subprocess
import time

import redis
from redis.exceptions import RedisError

from tests.redisproc import Closing, RedisServer, RedisServerError, free_port

SLOTS = 16384


def find_redis_cli() -> str:
    found = shutil.which("redis-cli")
    if found is None:
        raise RedisServerError("redis-cli not found on PATH (it comes with redis-server)")
    return found


def _call(port: int, *args: str) -> object:
    """One command on 127.0.0.1:`port` (None when the node does not answer)."""
    try:
        with redis.Redis(
            host="127.0.0.1", port=port, socket_timeout=1, socket_connect_timeout=1
        ) as client:
            return client.execute_command(*args)
    except (RedisError, OSError):
        return None


def _info(port: int) -> dict[str, str]:
    """CLUSTER INFO of the node on `port` ({} when it does not answer)."""
    reply = _call(port, "CLUSTER", "INFO")
    text = reply.decode() if isinstance(reply, bytes) else ""
    pairs = (line.partition(":") for line in text.splitlines())
    return {name: value.strip() for name, _, value in pairs if value}


def _replication(port: int) -> dict[str, object]:
    reply = _call(port, "INFO", "replication")
    return reply if isinstance(reply, dict) else {}


class RedisCluster(Closing):
    """Three masters and three replicas; `node_timeout_ms` is how long a master may be silent
    before the others fail it over."""

    def __init__(self, *, node_timeout_ms: int = 1000, startup_timeout: float = 30.0) -> None:
        self.node_timeout_ms = node_timeout_ms
        self.startup_timeout = startup_timeout
        args = [
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(node_timeout_ms),
            # A replica's first copy at once, not after the diskless sync's 5 s wait for others.
            "--repl-diskless-sync-delay", "0",
        ]  # fmt: skip
        # The bus port on a free port of its own: the default, port + 10000, may be taken or
        # past 65535.
        self.nodes = [
            RedisServer(args=[*args, "--cluster-port", str(free_port())]) for _ in range(6)
        ]

    @property
    def url(self) -> str:
        """Every node as a startup node, as an operator would list them."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    @property
    def alive(self) -> list[RedisServer]:
        return [node for node in self.nodes if node.running]

    def start(self) -> None:
        try:
            for node in self.nodes:
                node.start()
            create = subprocess.run(
                [find_redis_cli(), "--cluster", "create",
                 *(f"127.0.0.1:{n.port}" for n in self.nodes),
                 "--cluster-replicas", "1", "--cluster-yes"],
                capture_output=True, timeout=self.startup_timeout, check=False,
            )  # fmt: skip
            if create.returncode != 0:
                raise RedisServerError(
                    f"redis-cli --cluster create failed:\n{create.stdout.decode()[-2000:]}"
                    f"{create.stderr.decode()[-2000:]}"
                )
            self._wait(self._healthy, "cluster_state:ok on every node")
        except BaseException:
            self.close()
            raise

    def _healthy(self) -> bool:
        """Every node ok and knows every other; every master's replica in sync (a replica still
        loading its first copy would not be promoted)."""
        for node in self.alive:
            info = _info(node.port)
            if info.get("cluster_state") != "ok":
                return False
            if info.get("cluster_known_nodes") != str(len(self.nodes)):
                return False
            replication = _replication(node.port)
            if replication.get("role") == "master":
                replica = replication.get("slave0")
                if not isinstance(replica, dict) or replica.get("state") != "online":
                    return False
        return True

    def _wait(
        self, check: object, what: str, timeout: float | None = None, every: float = 0.02
    ) -> float:
        assert callable(check)
        started = time.monotonic()
        deadline = started + (timeout or self.startup_timeout)
        while time.monotonic() < deadline:
            if check():
                return time.monotonic() - started
            time.sleep(every)
        raise RedisServerError(f"the test cluster did not reach {what}")

    def master_of(self, slot: int) -> RedisServer:
        """The node serving `slot` now, as the survivors see it."""
        for node in self.alive:
            for start, end, master, *_ in _slots(node.port):
                if start <= slot <= end:
                    return self._by_port(master)
        raise RedisServerError(f"no live node knows who serves slot {slot}")

    def _by_port(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    def kill_master(self, slot: int) -> RedisServer:
        """Crash (SIGKILL) the master serving `slot`; the killed node."""
        master = self.master_of(slot)
        master.kill()
        return master

    def wait_promoted(self, dead: RedisServer, timeout: float = 20.0) -> float:
        """Seconds until a live node serves every slot `dead` served and every live node says
        the cluster is ok."""

        def promoted() -> bool:
            for node in self.alive:
                if _info(node.port).get("cluster_state") != "ok":
                    return False
                ranges = _slots(node.port)
                if sum(end - start + 1 for start, end, *_ in ranges) != SLOTS:
                    return False
                if any(master == dead.port for _, _, master, *_ in ranges):
                    return False
            return True

        # Polled every 50 ms, not faster: each poll asks every live node twice, and this runs
        # beside the gateways under test.
        what = f"a promoted replica for port {dead.port}"
        return self._wait(promoted, what, timeout, every=0.05)

    def wait_replicated(self, timeout: float = 10.0) -> float:
        """Seconds until every live master's replica has everything the master has (a write
        not yet copied would be lost by a failover)."""

        def copied() -> bool:
            for node in self.alive:
                replication = _replication(node.port)
                if replication.get("role") != "master":
                    continue
                replica = replication.get("slave0")
                if not isinstance(replica, dict):
                    return False
                if replica.get("offset") != replication.get("master_repl_offset"):
                    return False
            return True

        return self._wait(copied, "replicas in step with their masters", timeout)

    def flush(self) -> None:
        """Empty every master (the replicas follow)."""
        for node in self.alive:
            if _replication(node.port).get("role") == "master":
                _call(node.port, "FLUSHALL")

    def close(self) -> None:
        for node in self.nodes:
            node.close()

    def __enter__(self) -> RedisCluster:
        self.start()
        return self


def _slots(port: int) -> list[tuple[int, int, int]]:
    """CLUSTER SLOTS of the node on `port`: (first slot, last slot, master's port) each."""
    reply = _call(port, "CLUSTER", "SLOTS")
    if not isinstance(reply, list):
        return []
    return [(int(r[0]), int(r[1]), int(r[2][1])) for r in reply]
