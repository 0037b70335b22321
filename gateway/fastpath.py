"""The completion routes, served as raw ASGI in front of the framework.

Why: a cache hit's whole budget is a few tens of microseconds, and FastAPI's per-request machinery
(routing, dependency solving, response handling) alone costs more than that (measured: an empty
FastAPI route serves about half the requests per CPU-second of a bare Starlette one). So the two
hot paths skip it.

Guarantees: `POST /v1/chat/completions` and `POST /v1/completions` are answered here — the body is
read under the size limit (413 before it is fully read), the flow runs, its response is sent; any
other method on those paths is a 405; errors render exactly as in the rest of the app (OpenAI
shape; an unexpected exception is logged and becomes a 500, never a dropped connection). A client
that disconnects while sending its body gets nothing and costs nothing more. Every other path goes
to the wrapped application unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import APIError, error_response
from gateway.flow import ROUTES, RouteName
from gateway.state import AppState

log = logging.getLogger(__name__)

ROUTE_BY_PATH: dict[str, RouteName] = {spec.path: name for name, spec in ROUTES.items()}


class ClientGone(Exception):
    """The client disconnected before its request body was complete."""


def _too_large(limit: int) -> APIError:
    return APIError(413, f"Request body is larger than {limit} bytes.", code="body_too_large")


async def read_body(headers: Headers, receive: Receive, limit: int) -> bytes:
    """The whole request body, refused with 413 as soon as it is known to exceed `limit`."""
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise _too_large(limit)
        return body
    chunks = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class CompletionRoutes:
    """ASGI middleware that serves the completion routes itself."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            route = ROUTE_BY_PATH.get(scope["path"])
            if route is not None:
                await self._serve(route, scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _serve(self, route: RouteName, scope: Scope, receive: Receive, send: Send) -> None:
        response: Any
        if scope["method"] != "POST":
            response = error_response(
                APIError(405, "Method Not Allowed", code="method_not_allowed"),
                {"allow": "POST"},
            )
            await response(scope, receive, send)
            return
        state: AppState = scope["state"]["strata"]
        headers = Headers(scope=scope)
        try:
            raw = await read_body(headers, receive, state.body_limit)
            response = await state.service.complete(route, raw, headers)
        except ClientGone:
            return
        except APIError as exc:
            response = error_response(exc)
        except Exception as exc:
            log.error("unhandled error while serving %s", scope["path"], exc_info=exc)
            response = error_response(
                APIError(500, "internal error in the gateway", code="internal")
            )
        await response(scope, receive, send)
