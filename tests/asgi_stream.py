"""An httpx transport to an in-process ASGI app that streams like a real connection.

`httpx.ASGITransport` runs the app to the end and buffers the whole body, so a client can neither
read a stream as it is produced nor walk away from it, and an app that stops without finishing
its response fails an assertion. This one runs each request as a task: the response comes back at
`http.response.start`, its body arrives chunk by chunk, closing it early tells the app
`http.disconnect` (as a server does when the peer goes away), and an app that returns without
finishing its body reads, to the client, as a connection cut mid-body.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx

from engine.fake import Scope

_END = object()  # the body is complete
_CUT = object()  # the app returned without completing it


class StreamingASGITransport(httpx.AsyncBaseTransport):
    def __init__(self, app: Any) -> None:
        self.app = app
        self.tasks: set[asyncio.Task[None]] = set()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = b"".join([part async for part in request.stream])  # type: ignore[union-attr]
        scope: Scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": request.method,
            "headers": [(k.lower(), v) for k, v in request.headers.raw],
            "scheme": request.url.scheme,
            "path": request.url.path,
            "raw_path": request.url.raw_path.split(b"?")[0],
            "query_string": request.url.query,
            "server": (request.url.host, request.url.port),
            "client": ("127.0.0.1", 123),
            "root_path": "",
        }
        started: asyncio.Future[tuple[int, list[tuple[bytes, bytes]]]] = (
            asyncio.get_running_loop().create_future()
        )
        chunks: asyncio.Queue[object] = asyncio.Queue()
        gone = asyncio.Event()
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                started.set_result((message["status"], list(message.get("headers", []))))
            elif message["type"] == "http.response.body" and not gone.is_set():
                if message.get("body"):
                    chunks.put_nowait(message["body"])
                if not message.get("more_body", False):
                    chunks.put_nowait(_END)

        async def run() -> None:
            try:
                await self.app(scope, receive, send)
            except Exception as exc:
                if not started.done():
                    started.set_exception(exc)
            finally:
                if not started.done():
                    started.set_exception(RuntimeError("the app sent no response"))
                chunks.put_nowait(_CUT)

        task = asyncio.create_task(run())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        status, headers = await started
        return httpx.Response(status, headers=headers, stream=_Body(chunks, gone))

    async def idle(self, timeout: float = 10.0) -> None:
        """Wait until every app call has returned (the app noticed a disconnect, say)."""
        async with asyncio.timeout(timeout):
            while self.tasks:
                await asyncio.wait(set(self.tasks))

    async def aclose(self) -> None:
        for task in list(self.tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class _Body(httpx.AsyncByteStream):
    def __init__(self, chunks: asyncio.Queue[object], gone: asyncio.Event) -> None:
        self._chunks = chunks
        self._gone = gone

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            item = await self._chunks.get()
            if item is _END:
                return
            if item is _CUT:
                raise httpx.RemoteProtocolError(
                    "peer closed connection without sending complete message body"
                )
            assert isinstance(item, bytes)
            yield item

    async def aclose(self) -> None:
        self._gone.set()
