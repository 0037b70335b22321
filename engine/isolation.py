"""Per-tenant isolation of the engine's prefix cache.

Guarantees: every tenant gets its own vLLM `cache_salt`, an HMAC-SHA256 of the tenant name under a
server secret, so one tenant's prompts can neither warm nor be timed through another tenant's
prefix cache, and a client cannot choose (or guess) another tenant's salt: `salted_body` replaces
whatever `cache_salt` the client sent.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import orjson


def cache_salt(secret: bytes, tenant: str) -> str:
    return hmac.new(secret, b"strata-cache-salt\x00" + tenant.encode(), hashlib.sha256).hexdigest()


def salted_body(body: dict[str, Any], salt: str) -> bytes:
    """The request body to send upstream: the client's, with our `cache_salt`."""
    return orjson.dumps({**body, "cache_salt": salt})
