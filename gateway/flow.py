"""How one completion request is answered, top to bottom.

parse and validate → decide (policy) → look up (chain) → one engine call → store if storable →
respond. Guarantees: a hit does no work beyond parsing, validating, keying and one chain lookup
(with several engine replicas, the prefix-affinity key that routes a request among them is
computed only when the request goes to the engine);
the body sent to the engine is the one the client sent (plus the tenant's `cache_salt`, and
`stream_options.include_usage` on a stored stream whose client did not ask for usage — that usage
chunk is kept from the client); only complete successful answers are stored; the cache never fails
a request (the chain fails open); engine failures become OpenAI-shaped errors with the right
status; every answer says how it was served (`X-Strata-Cache`, and on hits `X-Strata-Layer` and
`Age`; on cacheable misses `X-Strata-TTL-Rule`, what set the TTL it is stored with: the client's
`X-Strata-TTL`, else the first matching TTL rule, else the default — chosen on the store path
only) and where the time went (`Server-Timing`). `fill` stores a given answer exactly where a
request's own answer would go (`strata warm`). What operators graph — seconds per lookup and
layer, tokens each cache answer saved, the similarity of L3 hits, the engine's time to first token
— goes into plain histograms and counters (`gateway.histogram`) read at scrape time: the hit path
touches no metric object.

Streams (`stream: true`) take the same path. A hit is replayed as an event stream
(`gateway.replay`), whichever way the answer was stored. A miss is relayed event by event as the
engine sends it; a cacheable one is reassembled on the way (`gateway.assembly`) and stored — in
L1 and L3 before `[DONE]` goes out, in L2 right after in the background (`CacheChain.set`) — only
when the engine finished it normally. An engine
failure mid-stream becomes an OpenAI error event and stores nothing; a client that goes away
closes the engine's stream (vLLM then aborts the generation) and stores nothing.

Concurrent identical cacheable misses (same exact key, so same tenant) are coalesced
(`gateway.coalesce`): the first asks the engine, the others wait for its complete answer — at
most `coalesce_wait` seconds, after which they ask the engine themselves and store nothing — and
get it as their own (`X-Strata-Cache: coalesced`), replayed as a stream if they asked for one. An
engine error reaches every waiter and is not cached. The leader's engine call does not depend on
its client: a non-streamed call runs in a task of its own, and a stream whose client goes away
while others wait on it is read to the end in the background and stored.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from secrets import token_bytes
from typing import Any, Literal

import orjson
from starlette.responses import Response

from caches import (
    CacheChain,
    CacheControl,
    CachedResponse,
    CacheKey,
    ControlError,
    Decision,
    build_key,
    decide,
    parse_cache_control,
    storable,
    usage_tokens,
)
from caches.embedder import Embedding
from caches.generations import Generations
from caches.semantic import SemanticCache
from caches.semantic_scope import SemanticScope, semantic_scope
from caches.ttl_rules import TTLRule, TTLRules
from config import Settings
from engine import Engine, EngineError, UpstreamResponse, upstream_error
from engine.client import EngineResponse
from engine.errors import EngineProtocolError
from engine.isolation import cache_salt, salted_body
from engine.routing import affinity_key
from gateway.coalesce import NO_ANSWER, Flight, Flights, Outcome
from gateway.entries import Filled, completion_object
from gateway.epochs import Epochs, FixedEpoch
from gateway.errors import APIError, error_payload
from gateway.histogram import LOOKUP_BUCKETS, SIMILARITY_BUCKETS, TTFT_BUCKETS, PlainHistogram
from gateway.replay import ReplayError, replay
from gateway.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    check_limits,
    parse_json_object,
    validate,
)
from gateway.sse import EventStreamResponse, data_event
from gateway.tee import StreamTee
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

# What the flow answers with: a whole body, or a stream it relays.
Answer = Response | EventStreamResponse

JSON = "application/json"
EVENT_STREAM = "text/event-stream"

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


@dataclass(slots=True)
class SavedTokens:
    """Tokens answers served without the engine would have cost it, from their stored usage."""

    prompt: int = 0
    completion: int = 0


def _usage_of(payload: Any) -> tuple[int, int]:
    return usage_tokens(payload) if isinstance(payload, dict) else (0, 0)


# While the engine's fingerprint was never established, the model behind an answer is unknown.
UNKNOWN_EPOCH = Decision(lookup=False, store=False, reason="model-unknown")

NAMESPACE_HEADER = "x-strata-namespace"
_NAMESPACE = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")


def _namespace(headers: Mapping[str, str]) -> str:
    """The namespace a client files its entries under (`X-Strata-Namespace`); "" for none."""
    value = headers.get(NAMESPACE_HEADER)
    if value is None:
        return ""
    if _NAMESPACE.fullmatch(value) is None:
        raise APIError(
            400,
            "X-Strata-Namespace must be 1-64 characters of letters, digits and _ . : -",
            param=NAMESPACE_HEADER,
            code="invalid_header",
        )
    return value


def _model_of(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    return model if isinstance(model, str) else ""


def _timing(parts: tuple[tuple[str, float], ...]) -> str:
    return ", ".join(f"{name};dur={seconds * 1000:.3f}" for name, seconds in parts)


def _wants_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _may_ask_usage(body: Mapping[str, Any]) -> bool:
    """Can the gateway add `include_usage` upstream and hide the usage chunk exactly? Only when
    the client set no other stream option (vLLM's `continuous_usage_stats` would change every
    chunk the client sees)."""
    options = body.get("stream_options")
    if options is None:
        return True
    only_usage = isinstance(options, dict) and set(options) <= {"include_usage"}
    return only_usage and not _wants_usage(body)


def _error_event(exc: EngineError) -> bytes:
    return data_event(orjson.dumps(error_payload(APIError.from_engine(exc))))


@dataclass(frozen=True, slots=True)
class StoreTarget:
    """Where a cacheable miss is stored once complete: its key and TTL, and for L3 its scope and
    the embedding the lookup already computed."""

    key: CacheKey
    ttl: int | None
    scope: SemanticScope | None
    embedding: Embedding | None
    # The flight this request leads, when identical requests may wait on it.
    flight: Flight | None = None
    # What decided `ttl` (`X-Strata-TTL-Rule`): a rule's name, `client` or `default`.
    ttl_rule: str = "default"


class _Lease:
    """Who closes an engine stream: the response, unless the relay handed it to a background
    reader (its client left while others wait for the answer)."""

    __slots__ = ("handed", "upstream")

    def __init__(self, upstream: UpstreamResponse) -> None:
        self.upstream = upstream
        self.handed = False


@dataclass(frozen=True, slots=True)
class Forgotten:
    """What `forget` removed: the exact key's digest, how many layers held it, and how many L3
    entries (it and its neighbours) this replica held."""

    key: str
    layers: int
    semantic: int


class CompletionService:
    """Answers completion requests from the cache chain or the engine."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        chain: CacheChain,
        *,
        clock: Callable[[], float] = time.time,
        observe_engine: Callable[[str, float], None] | None = None,
        semantic: SemanticCache | None = None,
        epochs: Epochs | None = None,
    ) -> None:
        self._engine = engine
        self._chain = chain
        self._clock = clock
        # Without a running gateway's epochs (tests, tools): the configured epoch, local
        # generations, no engine fingerprint.
        self.epochs = epochs or Epochs(
            settings.model_epoch, FixedEpoch(), Generations(None, settings.redis_key_prefix)
        )
        self._max_ttl = settings.max_ttl
        self._default_ttl = settings.default_ttl
        self._ttl_rules = TTLRules(
            [TTLRule(**rule.model_dump()) for rule in settings.ttl_rules],
            default_ttl=settings.default_ttl,
            max_ttl=settings.max_ttl,
        )
        self._max_entry = int(settings.max_entry_bytes)
        self._finish = settings.storable_finish_reasons
        self._enabled = settings.cache_enabled
        self._tenants = TenantResolver(settings.api_keys)
        secret = settings.cache_salt_secret
        self._salt_secret = secret.get_secret_value().encode() if secret else token_bytes(32)
        self._salting = settings.engine_cache_salt
        self._salts: dict[str, str] = {}
        # Several replicas routed by prefix: misses carry an affinity key (`engine.routing`).
        self._route_by_prefix = engine.prefix_routing
        self._block_chars = settings.routing_block_chars
        self._max_blocks = settings.routing_max_blocks
        self.engine_tokens = EngineTokens()
        # Plain counters, read by the metrics collector at scrape time: (route, status, outcome).
        self.outcomes: Counter[tuple[str, int, str]] = Counter()
        self._observe_engine = observe_engine
        self._semantic = semantic
        # Plain histograms and counters too, for the hit path's own numbers (`gateway.histogram`):
        # seconds per lookup by layer, tokens saved by layer (and "coalesced"), the similarity of
        # L3 hits, and the engine's time to first token of streamed misses by route.
        layers = [layer.name for layer in chain.layers] + ["l3"] * (semantic is not None)
        self.lookup_seconds = {name: PlainHistogram(LOOKUP_BUCKETS) for name in layers}
        self.tokens_saved = {name: SavedTokens() for name in [*layers, "coalesced"]}
        self.similarity = PlainHistogram(SIMILARITY_BUCKETS)
        self.ttft_seconds: dict[str, PlainHistogram] = {
            name: PlainHistogram(TTFT_BUCKETS) for name in ROUTES
        }
        self._semantic_max_chars = settings.semantic_max_chars
        self._coalesce_wait = settings.coalesce_wait
        self._max_messages = settings.max_messages
        self._max_chars = settings.max_content_chars
        self.flights = Flights()
        # Engine calls that outlive their request (see the module); cancelled by `aclose`.
        self._tasks: set[asyncio.Task[Any]] = set()

    def _spawn(self, work: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._reap)
        return task

    def _reap(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        exc = None if task.cancelled() else task.exception()
        if exc is not None and not isinstance(exc, APIError):  # an APIError was an answer
            log.error("background engine call failed", exc_info=exc)

    async def aclose(self) -> None:
        """Cancel the engine calls still running in the background (on shutdown)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _end(self, target: StoreTarget | None, outcome: Outcome) -> None:
        if target is not None and target.flight is not None:
            self.flights.end(target.key.digest, target.flight, outcome)

    def _end_failed(self, target: StoreTarget | None, exc: BaseException) -> None:
        """End the flight of a call that raised: its waiters get the client's error, or ask the
        engine themselves when there is none to give (cancelled, unexpected)."""
        self._end(target, Outcome(error=exc) if isinstance(exc, APIError) else NO_ANSWER)

    @property
    def semantic(self) -> SemanticCache | None:
        return self._semantic

    def salt_of(self, tenant: str) -> str:
        salt = self._salts.get(tenant)
        if salt is None:
            # Tenants come from configured keys, so this map stays as small as that list.
            salt = self._salts[tenant] = cache_salt(self._salt_secret, tenant)
        return salt

    def _upstream_body(
        self, body: dict[str, Any], raw: bytes, tenant: str, extra: dict[str, Any] | None = None
    ) -> bytes:
        if extra:
            body = {**body, **extra}
        elif not self._salting:
            return raw
        return salted_body(body, self.salt_of(tenant)) if self._salting else orjson.dumps(body)

    def _affinity(self, spec: RouteSpec, body: dict[str, Any], tenant: str) -> int | None:
        """The replica-routing key of a request the engine will answer; only on that path, and
        only when the engine routes by prefix. Tenants' prefixes are kept apart in vLLM by their
        salt, so they are apart here too."""
        if not self._route_by_prefix:
            return None
        salt = tenant if self._salting else str(body.get("cache_salt") or "")
        return affinity_key(
            spec.name, body, block_chars=self._block_chars, max_blocks=self._max_blocks, salt=salt
        )

    async def complete(self, route: RouteName, raw: bytes, headers: Mapping[str, str]) -> Answer:
        spec = ROUTES[route]
        try:
            response = await self._complete(spec, raw, headers)
        except APIError as exc:
            self.outcomes[(route, exc.status, "error")] += 1
            raise
        return response

    async def _complete(self, spec: RouteSpec, raw: bytes, headers: Mapping[str, str]) -> Answer:
        tenant = self._tenants.resolve(headers)
        body = parse_json_object(raw)
        validate(spec.schema, body)
        check_limits(body, max_messages=self._max_messages, max_chars=self._max_chars)
        control = self._control(headers)
        decision = decide(body, control, enabled=self._enabled)
        stream = body.get("stream") is True

        key: CacheKey | None = None
        timings: tuple[tuple[str, float], ...] = ()
        epoch = ""
        if decision.lookup or decision.store:
            keyed = self._key(spec, body, tenant, headers)
            if keyed is None:
                decision = UNKNOWN_EPOCH
            else:
                key, epoch = keyed
        if decision.lookup and key is not None:
            lookup = await self._chain.get(key, max_age=control.max_age)
            timings = lookup.timings
            for layer, seconds in timings:
                if seconds:  # 0.0: not asked (known absent, or its breaker open)
                    self.lookup_seconds[layer].observe(seconds)
            if lookup.value is not None:
                hit = self._hit(spec, body, lookup.value, lookup.layer or "", timings=timings)
                if hit is not None:
                    return hit

        # L3 only once L1/L2 missed: a hit there costs no embedding.
        scope = (
            self._semantic_scope(spec, body, tenant, epoch)
            if decision.lookup or decision.store
            else None
        )
        embedding: Embedding | None = None
        if scope is not None and decision.lookup and self._semantic is not None:
            started = time.perf_counter()
            near, embedding = await self._semantic.lookup(scope)
            seconds = time.perf_counter() - started
            self.lookup_seconds["l3"].observe(seconds)
            timings = (*timings, ("l3", seconds))
            if near is not None and (
                control.max_age is None or near.value.age(self._clock()) <= control.max_age
            ):
                hit = self._hit(
                    spec, body, near.value, "l3", timings=timings, similarity=near.similarity
                )
                if hit is not None:
                    self.similarity.observe(near.similarity)
                    return hit

        target = None
        answer = self._stream if stream else self._answer
        if decision.store and key is not None:
            flight = None
            if self._coalesce_wait > 0:
                flight, leads = self.flights.join(key.digest)
                if not leads:
                    return await self._follow(spec, body, raw, tenant, flight, timings=timings)
            ttl, rule = self._ttl(spec, body, tenant, headers, control)
            target = StoreTarget(key, ttl, scope, embedding, flight, rule)
        # From here on the leader's flight is ended by `_call` or by the stream's relay.
        return await answer(spec, body, raw, tenant, reason=decision.reason, target=target,
                            timings=timings)  # fmt: skip

    def _control(self, headers: Mapping[str, str]) -> CacheControl:
        """The client's cache-control headers; a 400 naming the malformed one."""
        try:
            return parse_cache_control(
                headers.get("cache-control"), headers.get("x-strata-ttl"), max_ttl=self._max_ttl
            )
        except ControlError as exc:
            raise APIError(400, str(exc), param=exc.header, code="invalid_header") from exc

    def _key(
        self, spec: RouteSpec, body: dict[str, Any], tenant: str, headers: Mapping[str, str]
    ) -> tuple[CacheKey, str] | None:
        """The exact key of a request and the epoch it is built under; `None` while the epoch
        of its model is not known. The one place keys are made: answers and fills agree."""
        epoch = self.epochs.of(tenant, _model_of(body), _namespace(headers))
        if epoch is None:
            return None
        return build_key(spec.name, body, tenant=tenant, epoch=epoch), epoch

    def _ttl(
        self,
        spec: RouteSpec,
        body: dict[str, Any],
        tenant: str,
        headers: Mapping[str, str],
        control: CacheControl,
    ) -> tuple[int, str]:
        """How long a cacheable miss is stored, and what decided it: the client's X-Strata-TTL
        (`client`), else the first TTL rule that matches (its name), else `default`. Only on the
        store path: a hit never gets here."""
        if control.ttl is not None:
            return control.ttl, "client"
        ttl, rule = self._ttl_rules.choose(spec.name, body, tenant, headers)
        return ttl, rule or "default"

    async def fill(
        self,
        route: RouteName,
        body: dict[str, Any],
        headers: Mapping[str, str],
        answer: str | dict[str, Any],
        *,
        usage: tuple[int, int] = (0, 0),
    ) -> Filled:
        """Store `answer` (a text, or a whole completion object) as the answer to `body`,
        where `_complete` will look for it: the same tenant, checks, policy, key, TTL choice and
        layers, L3 included. A 400 for a request the flow would not store, or an answer it would
        not store. For `POST /admin/cache/entries` (`strata warm`)."""
        spec = ROUTES[route]
        tenant = self._tenants.resolve(headers)
        validate(spec.schema, body)
        check_limits(body, max_messages=self._max_messages, max_chars=self._max_chars)
        control = self._control(headers)
        decision = decide(body, control, enabled=self._enabled)
        keyed = self._key(spec, body, tenant, headers) if decision.store else None
        if keyed is None:
            raise APIError(
                400,
                f"This request is not cached ({decision.reason or UNKNOWN_EPOCH.reason}), so "
                "no answer can be stored for it.",
                param="request",
                code="not_cacheable",
            )
        key, epoch = keyed
        payload = answer
        if isinstance(answer, str):
            created = int(self._clock())
            payload = completion_object(route, body["model"], answer, usage=usage, created=created)
        content = orjson.dumps(payload)
        if not storable(200, payload, self._finish):
            raise APIError(
                400,
                f"The answer is not complete: every choice needs a finish_reason in "
                f"{sorted(self._finish)}.",
                param="response",
                code="not_storable",
            )
        if len(content) > self._max_entry:
            raise APIError(
                400,
                f"The answer is larger than max_entry_bytes ({self._max_entry} bytes).",
                param="response",
                code="entry_too_large",
            )
        ttl, rule = self._ttl(spec, body, tenant, headers, control)
        scope = self._semantic_scope(spec, body, tenant, epoch)
        await self._store(StoreTarget(key, ttl, scope, None, ttl_rule=rule), content, payload)
        return Filled(key.digest, ttl, rule)

    async def forget(
        self, route: RouteName, body: dict[str, Any], headers: Mapping[str, str]
    ) -> Forgotten:
        """Remove the answer `body` gets from the cache: its exact entry from every layer (and
        from the memory of every replica), and in L3 that entry and every entry that would be
        served for its question. For answers reported bad (`POST /admin/cache/forget`)."""
        spec = ROUTES[route]
        tenant = self._tenants.resolve(headers)
        validate(spec.schema, body)
        keyed = self._key(spec, body, tenant, headers)
        if keyed is None:
            raise APIError(
                503,
                "The engine's model is not known yet, so neither is where its answers are kept.",
                code="model_unknown",
            )
        key, epoch = keyed
        exact = await self._chain.delete(key)
        await self.epochs.generations.drop(key.digest)
        semantic = 0
        scope = self._semantic_scope(spec, body, tenant, epoch)
        if scope is not None and self._semantic is not None:
            semantic = await self._semantic.forget(scope, key.digest)
        return Forgotten(key.digest, exact, semantic)

    async def _follow(
        self,
        spec: RouteSpec,
        body: dict[str, Any],
        raw: bytes,
        tenant: str,
        flight: Flight,
        *,
        timings: tuple[tuple[str, float], ...],
    ) -> Answer:
        """Wait for the identical request in flight; its answer is ours. Past the wait, or when
        it ended without an answer, ask the engine ourselves (and store nothing)."""
        started = time.perf_counter()
        outcome = await flight.wait(self._coalesce_wait)
        timings = (*timings, ("coalesced", time.perf_counter() - started))
        if outcome is not None and outcome.error is not None:
            raise outcome.error
        if outcome is not None and outcome.body is not None:
            streamed = body.get("stream") is True
            content = outcome.body
            if streamed:
                try:
                    content = replay(outcome.body, spec.name, include_usage=_wants_usage(body))
                except ReplayError:
                    content = b""
            if content:
                self.outcomes[(spec.name, 200, "coalesced")] += 1
                saved = self.tokens_saved["coalesced"]
                saved.prompt += outcome.prompt_tokens
                saved.completion += outcome.completion_tokens
                headers = {"x-strata-cache": "coalesced", "server-timing": _timing(timings)}
                if streamed:
                    headers["cache-control"] = "no-cache"
                media = EVENT_STREAM if streamed else JSON
                return Response(content, media_type=media, headers=headers)
        answer = self._stream if body.get("stream") is True else self._answer
        return await answer(spec, body, raw, tenant, reason="", target=None, timings=timings)

    async def _answer(
        self,
        spec: RouteSpec,
        body: dict[str, Any],
        raw: bytes,
        tenant: str,
        *,
        reason: str,
        target: StoreTarget | None,
        timings: tuple[tuple[str, float], ...],
    ) -> Response:
        """Ask the engine for the whole answer; store it when `target` says where."""
        call = self._call(spec, body, raw, tenant, target)
        if target is not None and target.flight is not None:
            # Its own task: a client that goes away does not take the others' answer with it.
            answer, engine_time = await asyncio.shield(self._spawn(call))
        else:
            answer, engine_time = await call
        timings = (*timings, ("engine", engine_time))
        outcome = "bypass" if reason in BYPASS_REASONS else "miss"
        self.outcomes[(spec.name, 200, outcome)] += 1
        headers = {"x-strata-cache": outcome, "server-timing": _timing(timings)}
        if reason:
            headers["x-strata-cache-reason"] = reason
        if target is not None:
            headers["x-strata-ttl-rule"] = target.ttl_rule
        return Response(answer.body, media_type=answer.content_type or JSON, headers=headers)

    async def _call(
        self,
        spec: RouteSpec,
        body: dict[str, Any],
        raw: bytes,
        tenant: str,
        target: StoreTarget | None,
    ) -> tuple[EngineResponse, float]:
        """One whole engine call: the answer and its time; stored, and the flight ended."""
        started = time.perf_counter()
        try:
            try:
                answer = await self._engine.post(
                    spec.path,
                    self._upstream_body(body, raw, tenant),
                    affinity=self._affinity(spec, body, tenant),
                )
            except EngineError as exc:
                raise APIError.from_engine(exc) from exc
            engine_time = time.perf_counter() - started
            if self._observe_engine is not None:
                self._observe_engine(spec.name, engine_time)
            if answer.status != 200:
                raise APIError.from_engine(upstream_error(answer.status, answer.body))
            try:
                payload = orjson.loads(answer.body)
            except orjson.JSONDecodeError:
                payload = None
            self.engine_tokens.count(payload)
            if target is not None:
                await self._store(target, answer.body, payload)
        except BaseException as exc:
            self._end_failed(target, exc)
            raise
        if target is not None and target.flight is not None:
            prompt, completion = _usage_of(payload)
            self._end(
                target, Outcome(answer.body, prompt_tokens=prompt, completion_tokens=completion)
            )
        return answer, engine_time

    def _semantic_scope(
        self, spec: RouteSpec, body: dict[str, Any], tenant: str, epoch: str
    ) -> SemanticScope | None:
        if self._semantic is None:
            return None
        found = semantic_scope(
            spec.name, body, tenant=tenant, epoch=epoch, max_chars=self._semantic_max_chars
        )
        return found if isinstance(found, SemanticScope) else None

    def _hit(
        self,
        spec: RouteSpec,
        body: dict[str, Any],
        value: CachedResponse,
        layer: str,
        *,
        timings: tuple[tuple[str, float], ...],
        similarity: float | None = None,
    ) -> Response | None:
        """The stored answer as the client asked for it; `None` when a stream cannot carry it."""
        streamed = body.get("stream") is True
        content = value.body
        if streamed:
            try:
                content = replay(value.body, spec.name, include_usage=_wants_usage(body))
            except ReplayError as exc:
                log.debug("a %s hit cannot be replayed as a stream (%s)", layer, exc)
                return None
        self.outcomes[(spec.name, 200, "hit")] += 1
        saved = self.tokens_saved[layer]
        saved.prompt += value.prompt_tokens
        saved.completion += value.completion_tokens
        headers = {
            "x-strata-cache": "hit",
            "x-strata-layer": layer,
            "age": str(int(value.age(self._clock()))),
            "server-timing": _timing(timings),
        }
        if similarity is not None:
            headers["x-strata-similarity"] = f"{similarity:.4f}"
        if streamed:
            headers["cache-control"] = "no-cache"
        return Response(content, media_type=EVENT_STREAM if streamed else JSON, headers=headers)

    async def _store(self, target: StoreTarget, body: bytes, payload: Any) -> None:
        """Write a complete answer through every layer, L3 included."""
        if len(body) > self._max_entry or not storable(200, payload, self._finish):
            return
        prompt, completion = usage_tokens(payload)
        now = self._clock()
        value = CachedResponse(
            body=body,
            created_at=now,
            expires_at=now + (target.ttl or self._default_ttl),
            prompt_tokens=prompt,
            completion_tokens=completion,
        )
        await self._chain.set(target.key, value)
        if target.scope is not None and self._semantic is not None:
            await self._semantic.store(target.scope, target.key, value, target.embedding)

    async def _stream(
        self,
        spec: RouteSpec,
        body: dict[str, Any],
        raw: bytes,
        tenant: str,
        *,
        reason: str,
        target: StoreTarget | None,
        timings: tuple[tuple[str, float], ...],
    ) -> Answer:
        """Open the engine's stream and relay it; with a `target`, reassemble and store it."""
        ask_usage = target is not None and _may_ask_usage(body)
        extra = {"stream_options": {"include_usage": True}} if ask_usage else None
        started = time.perf_counter()
        try:
            try:
                upstream = await self._engine.open_stream(
                    spec.path,
                    self._upstream_body(body, raw, tenant, extra),
                    affinity=self._affinity(spec, body, tenant),
                )
            except EngineError as exc:
                raise APIError.from_engine(exc) from exc
            if upstream.status != 200:
                try:
                    content = await upstream.read()
                except EngineError:
                    content = b""
                finally:
                    await upstream.aclose()
                raise APIError.from_engine(upstream_error(upstream.status, content))
        except BaseException as exc:
            self._end_failed(target, exc)
            raise
        timings = (*timings, ("engine", time.perf_counter() - started))
        outcome = "bypass" if reason in BYPASS_REASONS else "miss"
        self.outcomes[(spec.name, 200, outcome)] += 1
        headers = {"x-strata-cache": outcome, "server-timing": _timing(timings)}
        if reason:
            headers["x-strata-cache-reason"] = reason
        if target is not None:
            headers["x-strata-ttl-rule"] = target.ttl_rule
        lease = _Lease(upstream)
        events = (
            self._relay(spec, upstream, started)
            if target is None
            else self._tee(spec, lease, started, target, hide_usage=ask_usage)
        )

        async def close() -> None:
            if not lease.handed:
                await upstream.aclose()
                self._end(target, NO_ANSWER)  # a body that never started ends no flight itself

        # The response closes the engine's stream whatever happens, even before the first chunk.
        return EventStreamResponse(events, headers=headers, on_close=close)

    async def _relay(
        self, spec: RouteSpec, upstream: UpstreamResponse, started: float
    ) -> AsyncGenerator[bytes, None]:
        """Pass an uncached stream through byte for byte, as it arrives."""
        first = True
        try:
            async for chunk in upstream:
                if first:
                    first = False
                    self.ttft_seconds[spec.name].observe(time.perf_counter() - started)
                yield chunk
        except EngineError as exc:
            log.warning("engine stream broke off: %s", exc.message)
            yield _error_event(exc)
            return
        self._observe(spec, started)

    async def _tee(
        self,
        spec: RouteSpec,
        lease: _Lease,
        started: float,
        target: StoreTarget,
        *,
        hide_usage: bool,
    ) -> AsyncGenerator[bytes, None]:
        """Relay a cacheable stream event by event and store it once it finished normally."""
        tee = StreamTee(spec.name, hide_usage=hide_usage)
        first = True
        try:
            async for chunk in lease.upstream:
                if first:
                    first = False
                    self.ttft_seconds[spec.name].observe(time.perf_counter() - started)
                now, after = tee.feed(chunk)
                if now:
                    yield now
                if after:
                    # Owned by this response and awaited before `[DONE]`: a client that saw the
                    # whole answer can rely on the next identical request to this replica being
                    # a hit (L2's write, for the other replicas, follows in the background).
                    await self._store_stream(spec, tee.answer(), target, started)
                    yield after
        except EngineError as exc:
            self._end(target, Outcome(error=APIError.from_engine(exc)))
            if tee.done:
                return  # after `[DONE]`: the answer was whole, the client has it all
            log.warning("engine stream broke off: %s", exc.message)
            yield tee.flush() + _error_event(exc)
            return
        except (GeneratorExit, asyncio.CancelledError):
            # The client left. Others waiting on this answer still get it: read on without it.
            if target.flight is not None and target.flight.waiters and not tee.done:
                lease.handed = True
                self._spawn(self._finish_stream(spec, lease.upstream, tee, target, started))
            raise
        if not tee.done:
            log.warning("engine stream ended without [DONE]")
            error = EngineProtocolError("the engine's stream ended before [DONE]")
            self._end(target, Outcome(error=APIError.from_engine(error)))
            yield tee.flush() + _error_event(error)

    async def _finish_stream(
        self,
        spec: RouteSpec,
        upstream: UpstreamResponse,
        tee: StreamTee,
        target: StoreTarget,
        started: float,
    ) -> None:
        """Read an abandoned stream to its end for the requests waiting on it, and store it."""
        try:
            async for chunk in upstream:  # to its end: the connection goes back to the pool
                tee.feed(chunk)
            if tee.done:
                await self._store_stream(spec, tee.answer(), target, started)
        except EngineError as exc:
            log.warning("abandoned engine stream broke off: %s", exc.message)
        finally:
            # Without a whole answer the waiters ask the engine themselves.
            self._end(target, NO_ANSWER)
            await upstream.aclose()

    async def _store_stream(
        self, spec: RouteSpec, answer: dict[str, Any] | None, target: StoreTarget, started: float
    ) -> None:
        self._observe(spec, started)
        if answer is None:
            self._end(target, NO_ANSWER)
            return
        self.engine_tokens.count(answer)
        content = orjson.dumps(answer)
        prompt, completion = usage_tokens(answer)
        try:
            await self._store(target, content, answer)
        finally:
            self._end(target, Outcome(content, prompt_tokens=prompt, completion_tokens=completion))

    def _observe(self, spec: RouteSpec, started: float) -> None:
        if self._observe_engine is not None:
            self._observe_engine(spec.name, time.perf_counter() - started)
