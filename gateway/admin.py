"""Operator endpoints under `/admin`.

Guarantees: when an admin key is configured, every admin endpoint needs it (`Authorization: Bearer
KEY` or `X-Strata-Admin-Key: KEY`), compared in constant time and never logged; without one they are
open, for local use. Stats report per layer (L3 included when it is on) what it holds and this
process's hit, miss and error counts, its hit ratio (hits over lookups, `null` before the first)
and the prompt and completion tokens its answers saved the engine, plus the answers coalesced
requests shared; clear empties every layer and reports what each removed. `POST /cache/entries`
stores a given answer for a request (see `gateway.entries`) under the key real traffic uses, or
answers a 400 in OpenAI's shape; its tenant is the one whose API key is in `Authorization` (the
admin key then goes in `X-Strata-Admin-Key`).
"""

from __future__ import annotations

import hmac
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Request
from redis.exceptions import RedisError

from caches.generations import SCOPES, field
from gateway.entries import parse_entry, route_of
from gateway.errors import APIError
from gateway.fastpath import ClientGone, read_body
from gateway.schemas import parse_json_object
from gateway.state import state_of
from gateway.tenants import ANONYMOUS

# Tenant, model and namespace names an invalidation may name.
MAX_SCOPE_VALUE = 256

router = APIRouter(prefix="/admin")


def _presented_key(request: Request) -> str | None:
    header = request.headers.get("x-strata-admin-key")
    if header:
        return header
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def require_admin(request: Request) -> None:
    expected = state_of(request).settings.admin_key
    if expected is None:
        return
    presented = _presented_key(request)
    if presented is None or not hmac.compare_digest(
        presented.encode(), expected.get_secret_value().encode()
    ):
        raise APIError(401, "A valid admin key is required.", code="invalid_admin_key")


def _hit_ratio(hits: int, lookups: int) -> float | None:
    return hits / lookups if lookups else None


@router.get("/cache/stats", summary="Per-layer cache statistics")
async def cache_stats(request: Request) -> dict[str, Any]:
    require_admin(request)
    state = state_of(request)
    service = state.service
    layers = [asdict(report) for report in await state.chain.stats()]
    l3 = service.semantic
    if l3 is not None:
        c = l3.counters
        layers.append({
            "layer": "l3", "entries": l3.size, "bytes": None, "hits": c.hits,
            "misses": c.misses, "errors": c.errors, "stores": c.stores,
            "store_errors": c.store_errors, "available": True,
        })  # fmt: skip
    for layer in layers:
        lookups = layer["hits"] + layer["misses"] + layer["errors"]
        layer["hit_ratio"] = _hit_ratio(layer["hits"], lookups)
        layer["tokens_saved"] = asdict(service.tokens_saved[layer["layer"]])
    coalesced = sum(n for (_, _, outcome), n in service.outcomes.items() if outcome == "coalesced")
    return {
        "layers": layers,
        "coalesced": {
            "answers": coalesced,
            "tokens_saved": asdict(service.tokens_saved["coalesced"]),
        },
    }


async def _bump(request: Request, scope: str, value: str = "") -> int:
    generations = state_of(request).service.epochs.generations
    try:
        return await generations.bump(field(scope, value))
    except Exception as exc:
        # Nothing was invalidated anywhere: say so rather than pretend.
        raise APIError(
            503, f"Could not record the invalidation in Redis ({type(exc).__name__}).",
            code="cache_unavailable",
        ) from exc  # fmt: skip


@router.post("/cache/clear", summary="Remove every cached entry from every layer")
async def cache_clear(request: Request) -> dict[str, Any]:
    require_admin(request)
    state = state_of(request)
    # First the generation: every replica stops serving what it holds in memory, at once.
    generation = await _bump(request, "all")
    cleared: dict[str, int | None] = dict(await state.chain.clear())
    if state.service.semantic is not None:
        cleared["l3"] = await state.service.semantic.clear()
    return {"cleared": cleared, "generation": generation}


async def _json_object(request: Request) -> dict[str, Any]:
    state = state_of(request)
    try:
        raw = await read_body(request.headers, request.receive, state.body_limit)
    except ClientGone:
        raise APIError(400, "The request body did not arrive.", code="invalid_json") from None
    return parse_json_object(raw)


def _text_field(payload: dict[str, Any], name: str) -> str:
    value = payload.get(name)
    if not isinstance(value, str) or not value or len(value) > MAX_SCOPE_VALUE:
        raise APIError(
            400, f"`{name}` must be a non-empty string of at most {MAX_SCOPE_VALUE} characters.",
            param=name, code="invalid_value",
        )  # fmt: skip
    return value


@router.post("/cache/invalidate", summary="Stop serving every entry of a tenant, model, namespace")
async def cache_invalidate(request: Request) -> dict[str, Any]:
    """Body: `{"scope": "all" | "tenant" | "model" | "namespace", "value": "..."}` (no value for
    `all`). Entries of the scope are not served again by any replica; they are reclaimed by their
    TTL and eviction. `all` keeps the storage: `POST /admin/cache/clear` also empties it."""
    require_admin(request)
    payload = await _json_object(request)
    scope = payload.get("scope")
    if scope not in SCOPES:
        raise APIError(
            400, f"`scope` must be one of {list(SCOPES)}.", param="scope", code="invalid_value"
        )
    if unknown := set(payload) - {"scope", "value"}:
        raise APIError(400, f"Unknown fields: {sorted(unknown)}.", param=min(unknown),
                       code="invalid_value")  # fmt: skip
    value = "" if scope == "all" else _text_field(payload, "value")
    tenants = set(state_of(request).settings.api_keys) or {ANONYMOUS}
    if scope == "tenant" and value not in tenants:
        raise APIError(400, f"No tenant named {value!r} is configured.", param="value",
                       code="unknown_tenant")  # fmt: skip
    generation = await _bump(request, scope, value)
    return {"scope": scope, "value": value or None, "generation": generation}


@router.post("/cache/forget", summary="Remove a bad answer and its semantic neighbours")
async def cache_forget(request: Request) -> dict[str, Any]:
    """Body: `{"request": {...}, "route": "chat" | "completions" (optional)}`: the request that got
    the bad answer, with its tenant's API key in `Authorization` and its `X-Strata-Namespace`, as
    the client sent them (the admin key then goes in `X-Strata-Admin-Key`)."""
    require_admin(request)
    payload = await _json_object(request)
    body = payload.get("request")
    if not isinstance(body, dict):
        raise APIError(400, "`request` must be the request body (an object).", param="request",
                       code="invalid_value")  # fmt: skip
    route = route_of(body, payload.get("route"))
    try:
        forgotten = await state_of(request).service.forget(route, body, request.headers)
    except (ConnectionError, TimeoutError, RedisError) as exc:
        raise APIError(
            503, f"Could not tell the other replicas ({type(exc).__name__}); this one forgot it.",
            code="cache_unavailable",
        ) from exc  # fmt: skip
    return {"key": forgotten.key, "layers": forgotten.layers, "semantic": forgotten.semantic}


@router.post("/cache/entries", summary="Store an answer for a request, as the engine's would be")
async def cache_fill(request: Request) -> dict[str, Any]:
    require_admin(request)
    state = state_of(request)
    try:
        raw = await read_body(request.headers, request.receive, state.body_limit)
    except ClientGone:
        raise APIError(400, "The request body did not arrive.", code="invalid_json") from None
    entry = parse_entry(raw)
    filled = await state.service.fill(
        entry.route, entry.request, request.headers, entry.response, usage=entry.usage
    )
    return {"stored": True, "key": filled.key, "ttl": filled.ttl, "ttl_rule": filled.ttl_rule}
