"""Engine failures in one shape.

Guarantees: every way the engine can fail — unreachable, too slow, a broken connection, or an HTTP
error answer in any of the shapes OpenAI-compatible servers use — becomes one `EngineError` with
the status the client should see and OpenAI's error fields, mapped once, here.
"""

from __future__ import annotations

from typing import Any

import orjson


class EngineError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "server_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param


class EngineUnavailable(EngineError):
    def __init__(self, message: str = "the engine is unreachable") -> None:
        super().__init__(503, message, code="engine_unavailable")


class EngineTimeout(EngineError):
    def __init__(self, message: str = "the engine did not answer in time") -> None:
        super().__init__(504, message, code="engine_timeout")


class EngineProtocolError(EngineError):
    def __init__(self, message: str = "the engine sent a broken response") -> None:
        super().__init__(502, message, code="bad_gateway")


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def _default_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    if status in (401, 403):
        return "authentication_error"
    if status == 404:
        return "not_found_error"
    return "invalid_request_error" if 400 <= status < 500 else "server_error"


def upstream_error(status: int, body: bytes) -> EngineError:
    """The engine answered `status` (not 2xx) with `body`: keep its message, type, param, code.

    Understands OpenAI's `{"error": {...}}`, vLLM's older flat `{"object": "error", ...}`,
    FastAPI's `{"detail": ...}`, and falls back to the raw text.
    """
    payload: Any = None
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        payload = None
    fields: dict[str, Any] = {}
    if isinstance(payload, dict):
        inner = payload.get("error")
        if isinstance(inner, dict):
            fields = inner
        elif isinstance(inner, str):
            fields = {"message": inner}
        elif "message" in payload:
            fields = payload
        elif "detail" in payload:
            fields = {"message": _text(payload["detail"])}
    message = _text(fields.get("message")) or body[:500].decode("utf-8", "replace").strip()
    kind = _text(fields.get("type"))
    if not kind or kind in {"BadRequestError", "NotFoundError"}:
        kind = _default_type(status)
    return EngineError(
        status,
        message or f"the engine answered HTTP {status}",
        type=kind,
        code=_text(fields.get("code")),
        param=_text(fields.get("param")),
    )
