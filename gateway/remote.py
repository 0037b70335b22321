"""A client for a running gateway, for the operator commands (`strata cache ...`, `strata warm`).

Guarantees: one place decides where the gateway is (`--url`, else `STRATA_URL`, else
`http://127.0.0.1:8080`) and which admin key to present (`--admin-key`, else `STRATA_ADMIN_KEY`);
the key goes in a header and never into a message; every request has a timeout; a gateway that
cannot be reached or answers with an error becomes a `RemoteError` whose message is the gateway's
own (OpenAI-shaped) error message, never a traceback.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

DEFAULT_URL = "http://127.0.0.1:8080"


class RemoteError(Exception):
    """The gateway could not be reached, or answered with an error."""


@dataclass(frozen=True, slots=True)
class Target:
    url: str
    admin_key: str | None = None
    api_key: str | None = None

    @classmethod
    def resolve(
        cls, url: str | None, admin_key: str | None = None, api_key: str | None = None
    ) -> Target:
        return cls(
            url=(url or os.environ.get("STRATA_URL") or DEFAULT_URL).rstrip("/"),
            admin_key=admin_key or os.environ.get("STRATA_ADMIN_KEY") or None,
            api_key=api_key or os.environ.get("STRATA_API_KEY") or None,
        )

    def headers(self, *, admin: bool) -> dict[str, str]:
        """The tenant's API key as `Authorization` (who the request is for: the admin endpoints
        that act on one request's entries read it too); with `admin`, the admin key as
        `X-Strata-Admin-Key`."""
        headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        if admin and self.admin_key:
            headers["x-strata-admin-key"] = self.admin_key
        return headers


def _message(response: httpx.Response) -> str:
    try:
        payload = orjson.loads(response.content)
        message = payload["error"]["message"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        message = response.text[:200] or response.reason_phrase
    return f"HTTP {response.status_code}: {message}"


def admin_call(
    target: Target,
    method: str,
    path: str,
    *,
    body: Any = None,
    params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> Any:
    """One admin request; its JSON answer, or `RemoteError`."""
    try:
        response = httpx.request(
            method,
            target.url + path,
            content=None if body is None else orjson.dumps(body),
            params=params,
            headers={
                **target.headers(admin=True),
                **(headers or {}),
                "content-type": "application/json",
            },
            timeout=timeout,
        )
    except httpx.HTTPError as exc:
        raise RemoteError(f"cannot reach the gateway at {target.url}: {exc}") from None
    if response.status_code >= 400:
        raise RemoteError(_message(response))
    try:
        return orjson.loads(response.content)
    except orjson.JSONDecodeError:
        raise RemoteError(f"the gateway at {target.url} did not answer JSON") from None
