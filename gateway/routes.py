"""The framework-served routes: parse, delegate, render. No cache or engine logic lives here.

The completion routes are not here: `gateway.fastpath` serves them without the framework.

Guarantees: `/healthz` answers while the process runs; `/readyz` answers 200 while the engine
answers (and says whether Redis does — a Redis outage degrades caching but does not stop service)
and 503 when the engine does not; `/v1/models` is the engine's list; `/metrics` is Prometheus text.
"""

from __future__ import annotations

import asyncio

import orjson
from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from engine import EngineError, upstream_error
from gateway.errors import APIError
from gateway.state import state_of

router = APIRouter()

JSON = "application/json"


@router.get("/v1/models", summary="Models served by the engine")
async def models(request: Request) -> Response:
    try:
        answer = await state_of(request).engine.models()
    except EngineError as exc:
        raise APIError.from_engine(exc) from exc
    if answer.status != 200:
        raise APIError.from_engine(upstream_error(answer.status, answer.body))
    return Response(answer.body, media_type=JSON)


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: engine and Redis reachability")
async def readyz(request: Request) -> Response:
    state = state_of(request)
    redis = state.redis

    async def redis_check() -> str:
        if redis is None:
            return "disabled"
        return "up" if await redis.ping() else "down"

    engine_ok, redis_status = await asyncio.gather(state.engine.healthy(), redis_check())
    checks = {"engine": "up" if engine_ok else "down", "redis": redis_status}
    status = "ready"
    if not engine_ok:
        status = "unavailable"
    elif redis_status == "down":
        status = "degraded"
    return Response(
        orjson.dumps({"status": status, "checks": checks}),
        status_code=200 if engine_ok else 503,
        media_type=JSON,
    )


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    state = state_of(request)
    await state.engine_metrics.refresh()
    return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)
