"""A deterministic, in-process fake of an OpenAI-compatible engine (plain ASGI, no framework).

Guarantees: the same deterministic request (temperature 0 or a seed) always gets the same answer;
a sampled one (temperature > 0, no seed) gets a different answer each time, like a real engine.
It serves `/v1/chat/completions` and `/v1/completions` (JSON and SSE streams), `/v1/models` and
`/health`; answers unknown models with 404 and bad sampling values with 400 in vLLM's error shape;
records every call, every stream the client abandoned (noticed at once, also while it waits for
its first token or between tokens), and can be told to fail, to wait, or to cut a stream short;
`GET /fake/stats` reports those records for tests that run it as a process. Used by the tests and
benchmarks, and runnable on its own: `python -m engine.fake --port 9000`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import orjson

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "kernel",
    "cache",
    "prefix",
    "token",
    "batch",
    "stream",
    "layer",
    "vector",
    "engine",
    "replica",
    "query",
    "answer",
    "model",
    "tenant",
    "shard",
    "memory",
    "latency",
    "window",
    "paged",
    "block",
    "radix",
    "decode",
    "prefill",
]


@dataclass
class FakeEngine:
    model: str = "strata-fake"
    delay: float = 0.0  # seconds before the first byte of any answer
    chunk_delay: float = 0.0  # seconds between stream chunks
    # Seconds between a stream's headers and its first event: vLLM sends its headers at once and
    # the first token after prefill.
    first_token_delay: float = 0.0
    answer_bytes: int = 120  # approximate size of generated text
    words_per_chunk: int = 1
    calls: Counter[str] = field(default_factory=Counter)
    cancelled: int = 0
    completed_streams: int = 0
    # Forced answers for the next requests: (status, JSON body). Consumed in order.
    fail_next: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    # Cut every stream after this many content chunks, without `[DONE]`.
    break_stream_after: int | None = None
    last_bodies: list[dict[str, Any]] = field(default_factory=list)
    # Stands in for vLLM's chat template: changing it changes what `/tokenize` answers.
    chat_template: str = "default"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if method == "GET" and path == "/health":
            await _send_json(send, 200, {})
            return
        if method == "GET" and path == "/fake/stats":
            await _send_json(send, 200, self.stats())
            return
        if method == "GET" and path == "/v1/models":
            self.calls[path] += 1
            await _send_json(send, 200, self.models_payload())
            return
        if method == "POST" and path == "/tokenize":
            self.calls[path] += 1
            await self._tokenize(await _read_body(receive), send)
            return
        if method != "POST" or path not in ("/v1/chat/completions", "/v1/completions"):
            await _send_json(send, 404, _error(404, f"no route {method} {path}", "NotFoundError"))
            return
        self.calls[path] += 1
        raw = await _read_body(receive)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            await _send_json(send, 400, _error(400, "body is not JSON", "BadRequestError"))
            return
        if not isinstance(body, dict):
            await _send_json(send, 400, _error(400, "body must be an object", "BadRequestError"))
            return
        self.last_bodies = [*self.last_bodies[-49:], body]
        if self.fail_next:
            status, payload = self.fail_next.pop(0)
            await _send_json(send, status, payload)
            return
        problem = self._check(body)
        if problem is not None:
            await _send_json(send, problem[0], problem[1])
            return
        if self.delay:
            await asyncio.sleep(self.delay)
        chat = path == "/v1/chat/completions"
        if body.get("stream") is True:
            await self._stream(body, chat, receive, send)
        else:
            await _send_json(send, 200, self.answer(body, chat=chat))

    async def _tokenize(self, raw: bytes, send: Send) -> None:
        """vLLM's `/tokenize`: the "tokens" depend on the text and on `chat_template`."""
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict) or body.get("model") != self.model:
            await _send_json(send, 404, _error(404, "unknown model", "NotFoundError"))
            return
        text = body.get("prompt") if "prompt" in body else body.get("messages")
        material = orjson.dumps([self.chat_template if "messages" in body else "", text])
        tokens = list(hashlib.sha256(material).digest())
        await _send_json(send, 200, {"count": len(tokens), "max_model_len": 2048, "tokens": tokens})

    def stats(self) -> dict[str, Any]:
        return {
            "calls": dict(self.calls),
            "cancelled": self.cancelled,
            "completed_streams": self.completed_streams,
        }

    def models_payload(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.model,
                    "object": "model",
                    "created": 0,
                    "owned_by": "strata-fake",
                    "root": self.model,
                    "max_model_len": 2048,
                }
            ],
        }

    def _check(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
        if body.get("model") != self.model:
            message = f"The model `{body.get('model')}` does not exist."
            return 404, _error(404, message, "NotFoundError", param="model")
        temperature = body.get("temperature")
        if temperature is not None and (
            not isinstance(temperature, int | float) or not 0 <= temperature <= 2
        ):
            return 400, _error(
                400, "temperature must be in [0, 2]", "BadRequestError", param="temperature"
            )
        return None

    # --- deterministic generation ---

    def _words(self, body: dict[str, Any]) -> tuple[list[str], str, int]:
        material = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        seed = orjson.dumps(material, option=orjson.OPT_SORT_KEYS)
        if self.chat_template != "default":
            seed += self.chat_template.encode()  # another "model": other answers
        temperature = body.get("temperature", 1.0)
        if body.get("seed") is None and temperature != 0:
            seed += secrets.token_bytes(8)  # sampled: a new answer every time
        words: list[str] = []
        size = 0
        for counter in itertools.count():
            digest = hashlib.sha256(seed + counter.to_bytes(4, "little")).digest()
            for byte in digest:
                word = WORDS[byte % len(WORDS)]
                words.append(word)
                size += len(word) + 1
                if size >= self.answer_bytes:
                    break
            if size >= self.answer_bytes:
                break
        finish = "stop"
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
        if isinstance(max_tokens, int) and 0 < max_tokens < len(words):
            words, finish = words[:max_tokens], "length"
        prompt = _prompt_text(body)
        return words, finish, len(prompt.split())

    def answer(self, body: dict[str, Any], *, chat: bool) -> dict[str, Any]:
        words, finish, prompt_tokens = self._words(body)
        text = " ".join(words)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(words),
            "total_tokens": prompt_tokens + len(words),
        }
        created = int(time.time())
        if chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if body.get("tools") and body.get("tool_choice") != "none":
                message = {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [self._tool_call(body, words)],
                }
                finish = "tool_calls"
            return {
                "id": "chatcmpl-" + secrets.token_hex(8),
                "object": "chat.completion",
                "created": created,
                "model": self.model,
                "choices": [
                    {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
                ],
                "usage": usage,
            }
        return {
            "id": "cmpl-" + secrets.token_hex(8),
            "object": "text_completion",
            "created": created,
            "model": self.model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            "usage": usage,
        }

    @staticmethod
    def _tool_call(body: dict[str, Any], words: list[str]) -> dict[str, Any]:
        name = body["tools"][0].get("function", {}).get("name", "tool")
        arguments = orjson.dumps({"query": " ".join(words[:6]), "limit": len(words)}).decode()
        return {
            "id": "call_" + hashlib.sha256(arguments.encode()).hexdigest()[:12],
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }

    # --- streaming ---

    async def _stream(self, body: dict[str, Any], chat: bool, receive: Receive, send: Send) -> None:
        full = self.answer(body, chat=chat)
        disconnected = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected.set()

        watcher = asyncio.create_task(watch())
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")],
                }
            )
            await _pause(disconnected, self.first_token_delay)
            for event in self._events(body, full, chat):
                if disconnected.is_set():
                    self.cancelled += 1
                    return
                if event is None:  # the injected cut
                    return
                await send({"type": "http.response.body", "body": event, "more_body": True})
                await _pause(disconnected, self.chunk_delay)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            self.completed_streams += 1
        except OSError:
            self.cancelled += 1
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            watcher.cancel()

    def _events(self, body: dict[str, Any], full: dict[str, Any], chat: bool) -> list[bytes | None]:
        choice = full["choices"][0]
        base = {
            "id": full["id"],
            "created": full["created"],
            "model": full["model"],
            "object": "chat.completion.chunk" if chat else "text_completion",
        }

        def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            return b"data: " + orjson.dumps({**base, "choices": choices, **extra}) + b"\n\n"

        events: list[bytes | None] = []
        if chat:
            events.append(
                event(
                    [
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": ""},
                            "finish_reason": None,
                        }
                    ]
                )
            )
        text = choice["message"]["content"] if chat else choice["text"]
        pieces: list[str] = []
        if text:
            words = text.split(" ")
            step = self.words_per_chunk
            pieces = [
                " ".join(words[i : i + step]) + ("" if i + step >= len(words) else " ")
                for i in range(0, len(words), step)
            ]
        for number, piece in enumerate(pieces):
            if self.break_stream_after is not None and number >= self.break_stream_after:
                events.append(None)
                return events
            delta = (
                {"index": 0, "delta": {"content": piece}, "finish_reason": None}
                if chat
                else {"index": 0, "text": piece, "finish_reason": None}
            )
            events.append(event([delta]))
        if chat and choice["message"].get("tool_calls"):
            for index, call in enumerate(choice["message"]["tool_calls"]):
                arguments = call["function"]["arguments"]
                half = len(arguments) // 2
                events.append(
                    event(
                        [
                            {
                                "index": 0,
                                "delta": {
                                    "tool_calls": [
                                        {
                                            "index": index,
                                            "id": call["id"],
                                            "type": "function",
                                            "function": {
                                                "name": call["function"]["name"],
                                                "arguments": arguments[:half],
                                            },
                                        }
                                    ]
                                },
                                "finish_reason": None,
                            }
                        ]
                    )
                )
                events.append(
                    event(
                        [
                            {
                                "index": 0,
                                "delta": {
                                    "tool_calls": [
                                        {
                                            "index": index,
                                            "function": {"arguments": arguments[half:]},
                                        }
                                    ]
                                },
                                "finish_reason": None,
                            }
                        ]
                    )
                )
        finish = (
            {"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}
            if chat
            else {"index": 0, "text": "", "finish_reason": choice["finish_reason"]}
        )
        events.append(event([finish]))
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            events.append(event([], usage=full["usage"]))
        events.append(b"data: [DONE]\n\n")
        return events


async def _pause(interrupt: asyncio.Event, seconds: float) -> None:
    """Sleep, but wake up as soon as `interrupt` is set (the client went away)."""
    if seconds > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(interrupt.wait(), seconds)


def _prompt_text(body: dict[str, Any]) -> str:
    if isinstance(body.get("prompt"), str):
        return str(body["prompt"])
    parts = []
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            parts.append(content)
    return " ".join(parts)


def _error(status: int, message: str, kind: str, *, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _send_json(send: Send, status: int, payload: dict[str, Any]) -> None:
    body = orjson.dumps(payload)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def main(argv: list[str] | None = None) -> None:
    import uvicorn  # noqa: PLC0415 - only the standalone server needs it

    parser = argparse.ArgumentParser(description="Run the fake OpenAI-compatible engine.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--model", default="strata-fake")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--chunk-delay", type=float, default=0.0)
    parser.add_argument("--first-token-delay", type=float, default=0.0)
    parser.add_argument("--answer-bytes", type=int, default=120)
    parser.add_argument("--words-per-chunk", type=int, default=1)
    parser.add_argument(
        "--break-stream-after", type=int, default=None, help="cut every stream after N chunks"
    )
    args = parser.parse_args(argv)
    app = FakeEngine(
        model=args.model,
        delay=args.delay,
        chunk_delay=args.chunk_delay,
        first_token_delay=args.first_token_delay,
        answer_bytes=args.answer_bytes,
        words_per_chunk=args.words_per_chunk,
        break_stream_after=args.break_stream_after,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
