"""The physical limit for a Python ASGI server: a bare Starlette app serving one fixed answer.

`POST /v1/chat/completions` reads the request body (as the gateway must) and returns fixed,
pre-serialized bytes: the file named by `STRATA_BENCH_BODY_FILE` (the benchmark writes the
gateway's own cached answer there, so both serve identical bytes), or a built-in ~1 KB
`chat.completion` when the variable is unset. `GET /healthz` answers 200 for readiness checks.

Run it as the benchmark does:
`uvicorn bench.bare_app:app --loop uvloop --http httptools --no-access-log --log-level warning`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

BODY_FILE_ENV = "STRATA_BENCH_BODY_FILE"


def default_body(size: int = 1000) -> bytes:
    """A syntactically real `chat.completion` whose content is about `size` bytes long."""
    words = ("alpha beta gamma delta kernel cache prefix token batch stream " * 40).split()
    text = ""
    for word in words:
        if len(text) >= size:
            break
        text += word + " "
    payload = {
        "id": "chatcmpl-0123456789abcdef",
        "object": "chat.completion",
        "created": 0,
        "model": "strata-fake",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text.strip()},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 6, "completion_tokens": len(words), "total_tokens": 0},
    }
    return json.dumps(payload, separators=(",", ":")).encode()


def load_body() -> bytes:
    path = os.environ.get(BODY_FILE_ENV)
    return Path(path).read_bytes() if path else default_body()


BODY = load_body()


async def chat_completions(request: Request) -> Response:
    await request.body()
    return Response(BODY, media_type="application/json")


async def healthz(request: Request) -> Response:
    return Response(b"ok", media_type="text/plain")


app = Starlette(
    routes=[
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
    ]
)
