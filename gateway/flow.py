"""How one completion request is answered, top to bottom.

parse and validate → decide (policy) → look up (chain) → one engine call → store if storable →
respond. Guarantees: a hit does no work beyond parsing, validating, keying and one chain lookup;
the body sent to the engine is the one the client sent; only complete successful answers are
stored; the cache never fails a request (the chain fails open); engine failures become OpenAI-shaped
errors with the right status; every answer says how it was served (`X-Strata-Cache`, and on hits
`X-Strata-Layer` and `Age`) and where the time went (`Server-Timing`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from secrets import token_bytes
from typing import Any, Literal

import httpx
import orjson
from starlette.responses import Response, StreamingResponse

from caches import (
    CacheChain,
    CachedResponse,
    CacheKey,
    ControlError,
    build_key,
    decide,
    parse_cache_control,
    storable,
    usage_tokens,
)
from caches.semantic import SemanticCache, Vector
from caches.semantic_scope import SemanticScope, semantic_scope
from config import Settings
from engine import EngineClient, EngineError, upstream_error
from engine.isolation import cache_salt, salted_body
from gateway.errors import APIError, error_payload
from gateway.schemas import ChatCompletionRequest, CompletionRequest, parse_json_object, validate
from gateway.tenants import TenantResolver

log = logging.getLogger(__name__)

RouteName = Literal["chat", "completions"]


@dataclass(frozen=True, slots=True)
class RouteSpec:
    name: RouteName
    path: str
    schema: type[ChatCompletionRequest] | type[CompletionRequest]


ROUTES: dict[RouteName, RouteSpec] = {
    "chat": RouteSpec("chat", "/v1/chat/completions", ChatCompletionRequest),
    "completions": RouteSpec("completions", "/v1/completions", CompletionRequest),
}

JSON = "application/json"

# `bypass`: the client or the operator opted out of the cache. Requests the policy cannot cache
# (sampled, n > 1) are misses: the cache was consulted in spirit and had nothing to give.
BYPASS_REASONS = frozenset({"no-store", "disabled"})


@dataclass(slots=True)
class EngineTokens:
    """Prompt tokens the engine processed for answers it computed, and how many of those its
    prefix cache served (`usage.prompt_tokens_details.cached_tokens`)."""

    answers: int = 0
    prompt: int = 0
    cached: int = 0

    def count(self, payload: Any) -> None:
        usage = payload.get("usage") if isinstance(payload, dict) else None
        if not isinstance(usage, dict):
            return
        prompt = usage.get("prompt_tokens")
        if type(prompt) is not int:
            return
        self.answers += 1
        self.prompt += prompt
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        if type(cached) is int:
            self.cached += cached


def _timing(parts: tuple[tuple[str, float], ...]) -> str:
    return ", ".join(f"{name};dur={seconds * 1000:.3f}" for name, seconds in parts)


class CompletionService:
    """Answers completion requests from the cache chain or the engine."""

    def __init__(
        self,
        settings: Settings,
        engine: EngineClient,
        chain: CacheChain,
        *,
        clock: Callable[[], float] = time.time,
        observe_engine: Callable[[str, float], None] | None = None,
        semantic: SemanticCache | None = None,
    ) -> None:
        self._engine = engine
        self._chain = chain
        self._clock = clock
        self._epoch = settings.model_epoch
        self._max_ttl = settings.max_ttl
        self._default_ttl = settings.default_ttl
        self._max_entry = int(settings.max_entry_bytes)
        self._finish = settings.storable_finish_reasons
        self._enabled = settings.cache_enabled
        self._tenants = TenantResolver(settings.api_keys)
        secret = settings.cache_salt_secret
        self._salt_secret = secret.get_secret_value().encode() if secret else token_bytes(32)
        self._salting = settings.engine_cache_salt
        self._salts: dict[str, str] = {}
        self.engine_tokens = EngineTokens()
        # Plain counters, read by the metrics collector at scrape time: (route, status, outcome).
        self.outcomes: Counter[tuple[str, int, str]] = Counter()
        self._observe_engine = observe_engine
        self._semantic = semantic
        self._semantic_max_chars = settings.semantic_max_chars

    def salt_of(self, tenant: str) -> str:
        salt = self._salts.get(tenant)
        if salt is None:
            # Tenants come from configured keys, so this map stays as small as that list.
            salt = self._salts[tenant] = cache_salt(self._salt_secret, tenant)
        return salt

    def _upstream_body(self, body: dict[str, Any], raw: bytes, tenant: str) -> bytes:
        return salted_body(body, self.salt_of(tenant)) if self._salting else raw

    async def complete(self, route: RouteName, raw: bytes, headers: Mapping[str, str]) -> Response:
        spec = ROUTES[route]
        try:
            response = await self._complete(spec, raw, headers)
        except APIError as exc:
            self.outcomes[(route, exc.status, "error")] += 1
            raise
        return response

    async def _complete(self, spec: RouteSpec, raw: bytes, headers: Mapping[str, str]) -> Response:
        tenant = self._tenants.resolve(headers)
        body = parse_json_object(raw)
        validate(spec.schema, body)
        try:
            control = parse_cache_control(
                headers.get("cache-control"), headers.get("x-strata-ttl"), max_ttl=self._max_ttl
            )
        except ControlError as exc:
            raise APIError(400, str(exc), param=exc.header, code="invalid_header") from exc
        decision = decide(body, control, enabled=self._enabled)

        if body.get("stream") is True:
            return await self._relay_stream(spec, self._upstream_body(body, raw, tenant))

        key: CacheKey | None = None
        timings: tuple[tuple[str, float], ...] = ()
        if decision.lookup or decision.store:
            key = build_key(spec.name, body, tenant=tenant, epoch=self._epoch)
        if decision.lookup and key is not None:
            lookup = await self._chain.get(key, max_age=control.max_age)
            timings = lookup.timings
            if lookup.value is not None:
                return self._hit(spec, lookup.value, lookup.layer or "", timings)

        # L3 only once L1/L2 missed: a hit there costs no embedding.
        scope = (
            self._semantic_scope(spec, body, tenant) if decision.lookup or decision.store else None
        )
        vector: Vector | None = None
        if scope is not None and decision.lookup and self._semantic is not None:
            started = time.perf_counter()
            near, vector = await self._semantic.lookup(scope)
            timings = (*timings, ("l3", time.perf_counter() - started))
            if near is not None and (
                control.max_age is None or near.value.age(self._clock()) <= control.max_age
            ):
                return self._hit(spec, near.value, "l3", timings, near.similarity)

        started = time.perf_counter()
        try:
            answer = await self._engine.post(spec.path, self._upstream_body(body, raw, tenant))
        except EngineError as exc:
            raise APIError.from_engine(exc) from exc
        engine_time = time.perf_counter() - started
        if self._observe_engine is not None:
            self._observe_engine(spec.name, engine_time)
        timings = (*timings, ("engine", engine_time))
        if answer.status != 200:
            raise APIError.from_engine(upstream_error(answer.status, answer.body))

        outcome = "bypass" if decision.reason in BYPASS_REASONS else "miss"
        try:
            payload = orjson.loads(answer.body)
        except orjson.JSONDecodeError:
            payload = None
        self.engine_tokens.count(payload)
        if decision.store and key is not None:
            stored = await self._store(key, answer.body, payload, control.ttl)
            if stored is not None and scope is not None and self._semantic is not None:
                await self._semantic.store(scope, key, stored, vector)
        self.outcomes[(spec.name, 200, outcome)] += 1
        headers = {"x-strata-cache": outcome, "server-timing": _timing(timings)}
        if decision.reason:
            headers["x-strata-cache-reason"] = decision.reason
        return Response(answer.body, media_type=answer.content_type or JSON, headers=headers)

    def _semantic_scope(
        self, spec: RouteSpec, body: dict[str, Any], tenant: str
    ) -> SemanticScope | None:
        if self._semantic is None:
            return None
        found = semantic_scope(
            spec.name, body, tenant=tenant, epoch=self._epoch, max_chars=self._semantic_max_chars
        )
        return found if isinstance(found, SemanticScope) else None

    def _hit(
        self,
        spec: RouteSpec,
        value: CachedResponse,
        layer: str,
        timings: tuple[tuple[str, float], ...],
        similarity: float | None = None,
    ) -> Response:
        self.outcomes[(spec.name, 200, "hit")] += 1
        headers = {
            "x-strata-cache": "hit",
            "x-strata-layer": layer,
            "age": str(int(value.age(self._clock()))),
            "server-timing": _timing(timings),
        }
        if similarity is not None:
            headers["x-strata-similarity"] = f"{similarity:.4f}"
        return Response(value.body, media_type=JSON, headers=headers)

    async def _store(
        self, key: CacheKey, body: bytes, payload: Any, ttl: int | None
    ) -> CachedResponse | None:
        if len(body) > self._max_entry or not storable(200, payload, self._finish):
            return None
        prompt, completion = usage_tokens(payload)
        now = self._clock()
        value = CachedResponse(
            body=body,
            created_at=now,
            expires_at=now + (ttl or self._default_ttl),
            prompt_tokens=prompt,
            completion_tokens=completion,
        )
        await self._chain.set(key, value)
        return value

    async def _relay_stream(self, spec: RouteSpec, raw: bytes) -> Response:
        """Pass an SSE stream through chunk by chunk, uncached."""
        try:
            upstream = await self._engine.open_stream(spec.path, raw)
        except EngineError as exc:
            raise APIError.from_engine(exc) from exc
        if upstream.status_code != 200:
            try:
                content = await upstream.aread()
            except httpx.HTTPError:
                content = b""
            finally:
                await upstream.aclose()
            raise APIError.from_engine(upstream_error(upstream.status_code, content))
        self.outcomes[(spec.name, 200, "bypass")] += 1
        return StreamingResponse(
            self._relay(upstream),
            media_type="text/event-stream",
            headers={
                "x-strata-cache": "bypass",
                "x-strata-cache-reason": "stream",
                "cache-control": "no-cache",
            },
        )

    async def _relay(self, upstream: httpx.Response) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._engine.iter_stream(upstream):
                yield chunk
        except EngineError as exc:
            log.warning("engine stream broke off: %s", exc.message)
            yield b"data: " + orjson.dumps(error_payload(APIError.from_engine(exc))) + b"\n\n"
        finally:
            # Closing the upstream response makes the engine abort the generation.
            await upstream.aclose()
