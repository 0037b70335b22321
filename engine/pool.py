"""Several replicas of one engine behind one client: routing, in-flight accounting, ejection.

`EnginePool` offers the calls the gateway makes of an `EngineClient` (`post`, `open_stream`,
`get`, `probe`, `models`, `healthy`, `aclose`), over N `EngineClient`s that serve the same model.
Guarantees:

- Placement follows the policy (`engine.routing`): `prefix` — consistent hashing with bounded
  loads on the request's affinity key, in flight and in live prefixes per replica (remembered in
  an `engine.prefix_table.PrefixTable`: a prefix stays where it was placed while it is used and
  its replica holds no more than its share), least-loaded when it has none; `least_loaded`;
  `round_robin`. In-flight counts are exact: a whole answer counts until it is read, a stream
  until the caller closes it.
- Passive ejection: a replica whose connection cannot be opened (refused, connect timeout, its
  breaker open) or that times out is ejected for `ejection_window` seconds and takes no traffic.
  Active probes (`/health`, every `probe_interval` seconds, each bounded by the client's health
  timeout) bring an ejected replica back once its window has passed, and eject a healthy one
  after `PROBE_FAILURES` failed probes in a row.
- A request whose connection could not be opened — nothing reached that replica — is sent to
  another replica at once, each replica tried at most once, so a dead replica costs clients
  nothing once it is noticed. A request that was sent is never replayed elsewhere (the engine may
  have started on it); its failure is the client's.
- While every replica is ejected, requests are tried on all of them anyway (least loaded first,
  counted as `panic`), as Envoy does below its panic threshold, rather than refused because of
  what a probe saw seconds ago. When none can be reached: `EngineUnavailable` (503
  `engine_unavailable`), as with one engine.
- The gateway's own questions (`get`, `probe`, `models`) go to the first healthy replica in
  configured order and fail over to the next on any engine error (they are safe to repeat).
- The probe task is owned: started by `start`, cancelled and awaited by `aclose`, which also
  closes every client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

from engine.client import EngineClient, EngineResponse, read_whole
from engine.errors import EngineError, EngineTimeout, EngineUnavailable
from engine.prefix_table import PREFIX_TTL, PrefixTable
from engine.routing import (
    VNODES,
    Choice,
    Policy,
    Ring,
    in_turn,
    least_loaded,
)
from engine.transport import UpstreamResponse

log = logging.getLogger(__name__)

# Failed probes in a row that eject a replica no request has found failing: one slow `/health`
# on a busy CPU engine is not an outage.
PROBE_FAILURES = 2


@dataclass(slots=True)
class Replica:
    """One engine behind the pool and what the pool knows of it."""

    url: str
    client: EngineClient
    in_flight: int = 0
    answered: int = 0  # requests it answered (any HTTP status)
    failed: int = 0  # requests it failed without an answer
    ejections: int = 0
    ejected_until: float | None = None  # monotonic; None while it takes traffic
    probe_failures: int = 0

    @property
    def healthy(self) -> bool:
        return self.ejected_until is None


class _Tracked:
    """A replica's streamed response that gives back its in-flight slot when closed."""

    __slots__ = ("_inner", "_replica")

    def __init__(self, inner: UpstreamResponse, replica: Replica) -> None:
        self._inner = inner
        self._replica: Replica | None = replica

    @property
    def status(self) -> int:
        return self._inner.status

    @property
    def content_type(self) -> str | None:
        return self._inner.content_type

    async def receive(self) -> bytes:
        return await self._inner.receive()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._inner.__aiter__()

    async def read(self) -> bytes:
        return await self._inner.read()

    async def aclose(self) -> None:
        replica, self._replica = self._replica, None
        if replica is not None:  # first close only, before awaiting: a cancel cannot skip it
            replica.in_flight -= 1
        await self._inner.aclose()


class EnginePool:
    def __init__(
        self,
        clients: Sequence[EngineClient],
        *,
        policy: Policy = "prefix",
        load_factor: float = 1.25,
        load_slack: int = 0,
        ejection_window: float = 5.0,
        probe_interval: float = 2.0,
        vnodes: int = VNODES,
        prefix_ttl: float = PREFIX_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if len(clients) < 2:
            raise ValueError("a pool needs at least two replicas (one is an EngineClient)")
        if len({c.base_url for c in clients}) != len(clients):
            raise ValueError("every replica needs its own URL")
        if load_factor < 1 or load_slack < 0 or ejection_window <= 0 or probe_interval <= 0:
            raise ValueError(
                "load_factor must be >= 1, load_slack >= 0, ejection_window and probe_interval > 0"
            )
        self.replicas = [Replica(c.base_url, c) for c in clients]
        self.policy: Policy = policy
        self._factor = load_factor
        self._slack = load_slack
        self._window = ejection_window
        self._interval = probe_interval
        self._clock = clock
        self._ring = Ring([r.url for r in self.replicas], vnodes=vnodes)
        self.prefixes = PrefixTable(len(self.replicas), ttl=prefix_ttl, clock=clock)
        self._turn = 0
        # Routing decisions by reason (`engine.routing.REASONS`), read by the metrics collector.
        self.decisions: Counter[str] = Counter()
        self._probes: asyncio.Task[None] | None = None

    @property
    def prefix_routing(self) -> bool:
        """Whether requests should carry an affinity key (only the `prefix` policy reads it)."""
        return self.policy == "prefix"

    # --- routing ---

    def choose(self, affinity: int | None, tried: Sequence[bool]) -> Choice | None:
        """The replica for a request's next attempt; `None` when every one was tried."""
        healthy = [r.healthy for r in self.replicas]
        loads = [r.in_flight for r in self.replicas]
        turn = self._turn
        self._turn = (turn + 1) % len(self.replicas)
        retry = any(tried)
        if not any(healthy):
            index = least_loaded(loads, [not t for t in tried], turn)
            return None if index is None else Choice(index, "retry" if retry else "panic")
        eligible = [h and not t for h, t in zip(healthy, tried, strict=True)]
        if not any(eligible):
            return None
        choice: Choice | None
        if self.policy == "round_robin":
            index = in_turn(turn, eligible)
            choice = None if index is None else Choice(index, "round_robin")
        elif self.policy == "prefix" and affinity is not None:
            choice = self.prefixes.route(
                affinity, self._ring, loads, healthy, eligible, factor=self._factor,
                slack=self._slack,
            )  # fmt: skip
        else:
            index = least_loaded(loads, eligible, turn)
            choice = None if index is None else Choice(index, "least_loaded")
        if choice is not None and retry:
            choice = Choice(choice.index, "retry")
        return choice

    async def open_stream(
        self, path: str, body: bytes, *, affinity: int | None = None
    ) -> UpstreamResponse:
        """POST to the chosen replica and return its response, body unread; the caller must
        `aclose()` it (that ends its in-flight count)."""
        tried = [False] * len(self.replicas)
        last: EngineError | None = None
        while True:
            choice = self.choose(affinity, tried)
            if choice is None:
                raise last or EngineUnavailable("no engine replica is reachable")
            self.decisions[choice.reason] += 1
            replica = self.replicas[choice.index]
            tried[choice.index] = True
            replica.in_flight += 1
            try:
                response = await replica.client.open_stream(path, body)
            except EngineUnavailable as exc:
                # Nothing reached this replica: the request is free to go elsewhere.
                replica.in_flight -= 1
                replica.failed += 1
                self._eject(replica, exc.message)
                last = exc
                continue
            except BaseException as exc:
                replica.in_flight -= 1
                if isinstance(exc, EngineError):
                    replica.failed += 1
                    if isinstance(exc, EngineTimeout):
                        self._eject(replica, exc.message)
                raise
            replica.answered += 1
            if choice.reason == "panic":
                self._rejoin(replica)  # it answered: traffic need not wait for the next probe
            return _Tracked(response, replica)

    async def post(self, path: str, body: bytes, *, affinity: int | None = None) -> EngineResponse:
        """POST a JSON body to the chosen replica and read the whole answer."""
        return await read_whole(await self.open_stream(path, body, affinity=affinity))

    # --- the gateway's own questions ---

    async def _first(
        self, call: Callable[[EngineClient], Awaitable[EngineResponse]]
    ) -> EngineResponse:
        ordered = sorted(self.replicas, key=lambda r: not r.healthy)  # stable: config order
        last: EngineError | None = None
        for replica in ordered:
            try:
                return await call(replica.client)
            except EngineError as exc:
                last = exc
        raise last or EngineUnavailable("no engine replica is reachable")

    async def get(self, path: str, *, deadline: float | None = None) -> EngineResponse:
        return await self._first(lambda client: client.get(path, deadline=deadline))

    async def probe(self, path: str, body: bytes, *, deadline: float) -> EngineResponse:
        return await self._first(lambda client: client.probe(path, body, deadline=deadline))

    async def models(self) -> EngineResponse:
        return await self._first(lambda client: client.models())

    async def healthy(self) -> bool:
        """True while at least one replica answers its health check."""
        answers = await asyncio.gather(*(r.client.healthy() for r in self.replicas))
        return any(answers)

    # --- health ---

    def _eject(self, replica: Replica, why: str) -> None:
        until = self._clock() + self._window
        if replica.ejected_until is None:
            replica.ejections += 1
            # Its prefixes are unreachable now: placed afresh, elsewhere, from the next request.
            self.prefixes.forget_replica(self.replicas.index(replica))
            log.warning("engine replica %s ejected for %.1f s: %s", replica.url, self._window, why)
        replica.ejected_until = until
        replica.probe_failures = 0

    def _rejoin(self, replica: Replica) -> None:
        replica.ejected_until = None
        replica.probe_failures = 0
        # The probe just saw it answer: no need to wait out its breaker's cooldown as well.
        replica.client.breaker.success()
        log.warning("engine replica %s is back", replica.url)

    async def check(self) -> None:
        """Probe every replica once (concurrently) and update who takes traffic."""
        answers = await asyncio.gather(*(r.client.healthy() for r in self.replicas))
        now = self._clock()
        for replica, ok in zip(self.replicas, answers, strict=True):
            if ok:
                replica.probe_failures = 0
                if replica.ejected_until is not None and now >= replica.ejected_until:
                    self._rejoin(replica)
            elif replica.ejected_until is None:
                replica.probe_failures += 1
                if replica.probe_failures >= PROBE_FAILURES:
                    self._eject(replica, "its health check failed")

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.check()
            except Exception:
                log.exception("engine replica health check failed")

    async def start(self) -> None:
        """Start the health probes (the first after one `probe_interval`)."""
        if self._probes is None:
            self._probes = asyncio.create_task(self._probe_forever(), name="strata-engine-probes")

    async def aclose(self) -> None:
        if self._probes is not None:
            self._probes.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probes
            self._probes = None
        await asyncio.gather(*(r.client.aclose() for r in self.replicas))
