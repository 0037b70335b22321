"""The epoch a request's cache entries belong to: configured, engine-derived and invalidation
generations, as one string that goes into every cache key and semantic partition.

Guarantees:
- `Epochs.of(tenant, model, namespace)` combines the operator's `model_epoch`, the engine's
  fingerprint (`engine.fingerprint`: served models, weights, context length, tokenizer and chat
  template) and the generations of everything, the tenant, the model and the namespace
  (`caches.generations`). Change any of them and no entry of the old epoch is found again, in any
  layer; it costs dict lookups and one string, no I/O.
- `of` is `None` while the engine's fingerprint has never been established (an engine that could
  not be asked since start): then nothing is looked up or stored, rather than serving or storing
  answers whose model is unknown. Once known, a fingerprint is kept while the engine cannot be
  asked (cache hits go on during an engine outage) and replaced when the engine answers with
  another one.
- `EngineEpoch` asks the engine every `interval` seconds (one `GET /v1/models` and one
  `POST /tokenize` per served model) in one owned task, each check bounded by `deadline`.
  A model or template change means restarting vLLM; the first check after the new engine answers
  switches the epoch, so old answers can be served for at most `interval` seconds after the new
  engine is up — and only when no check caught the restart in between. With several replicas
  (`engine.pool`), which serve one model, the first healthy one in configured order is asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from caches.generations import Generations
from engine import Engine
from engine.fingerprint import fingerprint

log = logging.getLogger(__name__)


class EngineEpoch:
    def __init__(self, engine: Engine, *, interval: float, deadline: float = 5.0) -> None:
        self._engine = engine
        self._interval = interval
        self._deadline = deadline
        self.value: str | None = None
        self.changes = 0
        self.checks = 0
        self._task: asyncio.Task[None] | None = None

    async def check(self) -> bool:
        """Ask the engine now; True when its fingerprint changed (a first one counts)."""
        found = await fingerprint(self._engine, deadline=self._deadline)
        self.checks += 1
        if found is None or found == self.value:
            return False
        if self.value is None:
            log.info("engine fingerprint %s", found)
        else:
            log.warning(
                "the engine's model changed (fingerprint %s -> %s): entries of the old model "
                "are no longer served",
                self.value,
                found,
            )
            self.changes += 1
        self.value = found
        return True

    async def start(self) -> None:
        await self.check()
        if self.value is None:
            log.warning("engine fingerprint unknown (engine unreachable): not caching until known")
        self._task = asyncio.create_task(self._poll(), name="strata-engine-epoch")

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.check()
            except Exception:
                log.exception("engine fingerprint check failed")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class FixedEpoch:
    """The engine part of the epoch when fingerprinting is off: the operator's word only."""

    value: str | None = "-"


class Epochs:
    # Distinct (tenant, model, namespace) strings remembered between changes; past it, forgotten.
    MEMO = 4096

    def __init__(
        self, base: str, engine: EngineEpoch | FixedEpoch, generations: Generations
    ) -> None:
        self._base = base
        self.engine = engine
        self.generations = generations
        # The strings built since the engine's fingerprint or a generation last changed: a hit
        # pays one tuple and one dict lookup for its epoch, not the string building.
        self._memo: dict[tuple[str, str, str], str] = {}
        self._state: tuple[str | None, int] = (None, -1)

    def of(self, tenant: str, model: str, namespace: str) -> str | None:
        engine = self.engine.value
        if engine is None:
            return None
        state = (engine, self.generations.version)
        if state != self._state:
            self._memo.clear()
            self._state = state
        key = (tenant, model, namespace)
        found = self._memo.get(key)
        if found is None:
            if len(self._memo) >= self.MEMO:
                self._memo.clear()
            get = self.generations.get
            found = self._memo[key] = (
                f"{self._base}|{engine}|{get('all')}.{get('t:' + tenant)}.{get('m:' + model)}."
                f"{get('n:' + namespace)}|{namespace}"
            )
        return found
