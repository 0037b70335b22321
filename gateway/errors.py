"""Every error the gateway answers, in OpenAI's shape.

Guarantees: a client sees `{"error": {"message", "type", "param", "code"}}` with a meaningful HTTP
status for bad input (400/413/422), missing routes (404/405), authentication (401), engine failures
(the engine's own status, or 502/503/504), and even for a bug (500, logged with its traceback, the
message free of internals).
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from engine import EngineError

log = logging.getLogger(__name__)

_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


class APIError(Exception):
    """An error to answer with, raised anywhere in request handling."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _STATUS_TYPES.get(status, "server_error")
        self.param = param
        self.code = code

    @classmethod
    def from_engine(cls, exc: EngineError) -> APIError:
        return cls(exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code)


def error_payload(exc: APIError) -> dict[str, Any]:
    return {
        "error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}
    }


def error_response(exc: APIError, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(error_payload(exc)),
        status_code=exc.status,
        media_type="application/json",
        headers=headers,
    )


# Pydantic adds the member type of a union to an error's location ("content", "str"); a client
# needs the parameter, not our schema's internals.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "list", "dict"})


def _is_type_tag(part: str) -> bool:
    return part in _TYPE_TAGS or any(ch in part for ch in "[-")


def _loc(loc: tuple[Any, ...] | list[Any]) -> str | None:
    parts: list[str] = []
    for part in loc:
        if isinstance(part, str) and (part == "body" or _is_type_tag(part)):
            if part == "body":
                continue
            break
        parts.append(str(part))
    if not parts:
        return None
    out = parts[0]
    for part in parts[1:]:
        out += f"[{part}]" if part.isdigit() else f".{part}"
    return out


def validation_error(errors: list[Any]) -> APIError:
    """Pydantic's error list as one readable 400, naming the first offending parameter."""
    first = errors[0] if errors else {}
    param = _loc(first.get("loc", ()))
    details = "; ".join(
        f"{_loc(e.get('loc', ())) or 'body'}: {e.get('msg', 'invalid')}" for e in errors[:5]
    )
    return APIError(400, f"Invalid request: {details}", param=param, code="invalid_value")


def install(app: FastAPI) -> None:
    async def on_api_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return error_response(exc)

    async def on_http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return error_response(APIError(exc.status_code, message), dict(exc.headers or {}))

    async def on_validation_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return error_response(validation_error(list(exc.errors())))

    async def on_unexpected(_: Request, exc: Exception) -> Response:
        log.error("unhandled error while serving a request", exc_info=exc)
        return error_response(APIError(500, "internal error in the gateway", code="internal"))

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_unexpected)
