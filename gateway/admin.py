"""Operator endpoints under `/admin`.

Guarantees: when an admin key is configured, every admin endpoint needs it (`Authorization: Bearer
KEY` or `X-Strata-Admin-Key: KEY`), compared in constant time and never logged; without one they are
open, for local use. Stats report per layer what it holds and this process's hit, miss and error
counts; clear empties every layer and reports what each removed.
"""

from __future__ import annotations

import hmac
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Request

from gateway.errors import APIError
from gateway.state import state_of

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


@router.get("/cache/stats", summary="Per-layer cache statistics")
async def cache_stats(request: Request) -> dict[str, Any]:
    require_admin(request)
    reports = await state_of(request).chain.stats()
    return {"layers": [asdict(report) for report in reports]}


@router.post("/cache/clear", summary="Remove every cached entry from every layer")
async def cache_clear(request: Request) -> dict[str, Any]:
    require_admin(request)
    cleared = await state_of(request).chain.clear()
    return {"cleared": cleared}
