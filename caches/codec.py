"""The stored form of a cache entry, for layers that keep bytes outside the process.

Guarantees: entries are msgpack maps (no pickle) carrying a format version and the key material
they were stored under. `decode` returns the value only when the version is known, the key material
matches the key being read, and every field has the right type; anything else raises
`CorruptEntry`, which readers treat as a miss and a reason to delete the entry.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack

from caches.base import CachedResponse, CacheKey

FORMAT_VERSION = 1


class CorruptEntry(ValueError):
    """A stored value is unreadable, from another format version, or stored under another key."""


def encode(key: CacheKey, value: CachedResponse) -> bytes:
    record = {
        "v": FORMAT_VERSION,
        "d": key.digest,
        "t": key.tenant,
        "m": key.model,
        "r": key.route,
        "c": value.created_at,
        "x": value.expires_at,
        "b": value.body,
        "p": value.prompt_tokens,
        "o": value.completion_tokens,
    }
    packed: bytes = msgpack.packb(record, use_bin_type=True)
    return packed


def _field(record: dict[Any, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = record.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise CorruptEntry(f"field {name!r} missing or of the wrong type")
    return value


def decode(key: CacheKey, data: bytes) -> CachedResponse:
    try:
        record = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise CorruptEntry(f"not a msgpack record: {exc}") from exc
    if not isinstance(record, dict):
        raise CorruptEntry("not a map")
    if record.get("v") != FORMAT_VERSION:
        raise CorruptEntry(f"format version {record.get('v')!r} is not {FORMAT_VERSION}")
    if (
        _field(record, "d", str) != key.digest
        or _field(record, "t", str) != key.tenant
        or _field(record, "m", str) != key.model
        or _field(record, "r", str) != key.route
    ):
        raise CorruptEntry("stored under another key")
    created = _field(record, "c", (int, float))
    expires = _field(record, "x", (int, float))
    # NaN never compares as expired or too old: such an entry would be served forever.
    if not (math.isfinite(created) and math.isfinite(expires)):
        raise CorruptEntry("non-finite times")
    if expires < created:
        raise CorruptEntry("expires before it was created")
    return CachedResponse(
        body=_field(record, "b", bytes),
        created_at=float(created),
        expires_at=float(expires),
        prompt_tokens=_field(record, "p", int),
        completion_tokens=_field(record, "o", int),
    )
