"""Who is asking: API keys to tenants.

Guarantees: with no keys configured every request belongs to the one anonymous tenant (local use);
with keys, a request needs `Authorization: Bearer KEY` for a known key, else a 401 in OpenAI's
shape. Keys are looked up by their SHA-256 and confirmed with a constant-time comparison, so
timing reveals nothing about stored keys; keys never appear in logs or errors.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

from pydantic import SecretStr

from gateway.errors import APIError

ANONYMOUS = "anonymous"


class TenantResolver:
    def __init__(self, api_keys: Mapping[str, SecretStr]) -> None:
        self._by_digest: dict[bytes, tuple[str, bytes]] = {}
        for tenant, key in api_keys.items():
            secret = key.get_secret_value().encode()
            self._by_digest[hashlib.sha256(secret).digest()] = (tenant, secret)

    @property
    def required(self) -> bool:
        return bool(self._by_digest)

    def resolve(self, headers: Mapping[str, str]) -> str:
        if not self._by_digest:
            return ANONYMOUS
        scheme, _, token = headers.get("authorization", "").partition(" ")
        presented = token.strip().encode()
        if scheme.lower() == "bearer" and presented:
            found = self._by_digest.get(hashlib.sha256(presented).digest())
            if found is not None and hmac.compare_digest(found[1], presented):
                return found[0]
        raise APIError(
            401,
            "Incorrect or missing API key. Send it as `Authorization: Bearer KEY`.",
            code="invalid_api_key",
        )
