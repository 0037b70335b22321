"""The OpenAPI schema, including the completion routes that `gateway.fastpath` serves.

Guarantees: `/openapi.json` describes every route a client can call — the framework's own and the
two raw-ASGI completion routes, with their request bodies (from `gateway.schemas`) and their error
responses — and is built once, on first request.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from gateway.flow import ROUTES

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

_ERRORS = {
    "400": "invalid JSON, missing or mistyped fields, bad cache-control headers",
    "404": "the engine does not serve this model",
    "413": "request body over the configured limit",
    "502": "the engine's connection broke",
    "503": "the engine is unreachable",
    "504": "the engine did not answer in time",
}


def _completion_path(name: str, schema_name: str) -> dict[str, Any]:
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    responses: dict[str, Any] = {
        "200": {
            "description": "The engine's answer (JSON, or an SSE stream when `stream` is true); "
            "`X-Strata-Cache` says whether it came from the cache.",
            "content": {
                "application/json": {"schema": {"type": "object"}},
                "text/event-stream": {"schema": {"type": "string"}},
            },
        }
    }
    responses.update(
        {code: {"description": text, "content": error} for code, text in _ERRORS.items()}
    )
    return {
        "post": {
            "operationId": f"create_{name}",
            "summary": "Chat completion" if name == "chat" else "Text completion",
            "description": "OpenAI-compatible; forwarded to the engine as sent. Deterministic "
            "requests (temperature 0 or a seed) are cached.",
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{schema_name}"}}
                },
            },
            "responses": responses,
        }
    }


def build_schema(app: FastAPI) -> dict[str, Any]:
    schema = get_openapi(
        title=app.title, version=app.version, summary=app.summary, routes=app.routes
    )
    components: dict[str, Any] = schema.setdefault("components", {}).setdefault("schemas", {})
    components["ErrorResponse"] = _ERROR
    for name, spec in ROUTES.items():
        body = spec.schema.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components[spec.schema.__name__] = body
        schema["paths"][spec.path] = _completion_path(name, spec.schema.__name__)
    return schema


def document_completion_routes(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_schema(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
