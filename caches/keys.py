"""Exact-match cache keys.

Guarantees: two request bodies get the same key only if they agree on every field that can change
the engine's output, after dropping fields that provably cannot (`stream`, `stream_options`, the
end-user id, scheduling hints, and `cache_salt`, which the gateway sets itself) and `null`s, which
mean "default" in the OpenAI API. Unknown fields (engine extras such as `top_k` or `guided_json`)
are part of the key. The tenant, the route and the model epoch are part of the key material, so
tenants never share entries and an epoch change orphans every older entry.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import orjson

from caches.base import CacheKey

KEY_VERSION = 1

# Fields that do not change what the engine generates. Everything else is key material.
IGNORED_FIELDS = frozenset(
    {"stream", "stream_options", "user", "request_id", "priority", "cache_salt"}
)

# Sampling parameters the engine reads as floats: 0 and 0.0 mean the same thing.
FLOAT_FIELDS = frozenset(
    {
        "temperature",
        "top_p",
        "min_p",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "length_penalty",
    }
)


def canonical_body(body: Mapping[str, Any]) -> dict[str, Any]:
    """The output-affecting part of a request body, normalised."""
    out: dict[str, Any] = {}
    for name, value in body.items():
        if value is None or name in IGNORED_FIELDS:
            continue
        out[name] = float(value) if name in FLOAT_FIELDS and type(value) is int else value
    return out


def build_key(route: str, body: Mapping[str, Any], *, tenant: str, epoch: str) -> CacheKey:
    """The exact key for `body` sent to `route` by `tenant` under model epoch `epoch`."""
    material = {
        "v": KEY_VERSION,
        "route": route,
        "tenant": tenant,
        "epoch": epoch,
        "body": canonical_body(body),
    }
    # OPT_SORT_KEYS sorts nested objects too, so key order in the request never matters.
    encoded = orjson.dumps(material, option=orjson.OPT_SORT_KEYS)
    model = body.get("model")
    return CacheKey(
        digest=hashlib.sha256(encoded).hexdigest(),
        tenant=tenant,
        model=model if isinstance(model, str) else "",
        route=route,
    )
