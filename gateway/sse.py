"""Server-sent events on the wire: reading an engine's stream, and sending one to a client.

Guarantees:
- `EventReader` splits a byte stream, fed in arbitrary pieces, into whole events exactly as the
  SSE specification frames them (lines end in CRLF, LF or CR; a blank line ends an event; `data`
  lines are joined with LF; comments and other fields are kept in the raw bytes but carry no
  data). Each event comes back with its raw bytes, so a relay can forward it unchanged.
- `EventStreamResponse` sends an async generator's chunks as they come and owns the generator:
  when the client disconnects, the generator is stopped at once, whatever the server's ASGI
  version; the generator is always closed, and then `on_close` awaited (to close an upstream
  stream, say), before the response returns — even if the body never started, and never left to
  the garbage collector. That cleanup is shielded from the disconnect and bounded in time.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass

import anyio
from starlette.types import Receive, Scope, Send

DONE = b"[DONE]"
# Seconds a response waits for its body generator to clean up after the client went away.
CLOSE_TIMEOUT = 5.0
DONE_EVENT = b"data: [DONE]\n\n"

# Line terminators, in the order the specification lists them.
_LINE_END = re.compile(rb"\r\n|\r|\n")


def data_event(payload: bytes) -> bytes:
    """One SSE event carrying `payload` (a single line of JSON) as its data."""
    return b"data: " + payload + b"\n\n"


@dataclass(frozen=True, slots=True)
class Event:
    """One whole event: its bytes as received, and its data (`None` when it had no data line)."""

    raw: bytes
    data: bytes | None


class EventReader:
    """Incremental SSE framing. `feed` returns the events completed by each new piece."""

    def __init__(self) -> None:
        self._pending = b""
        # The last event ended in a lone CR at the end of a piece: a LF opening the next piece
        # belongs to that CRLF, not to a new (empty) line.
        self._after_cr = False
        self._skip = 0

    @property
    def pending(self) -> bytes:
        """Bytes received after the last complete event."""
        return self._pending

    def feed(self, chunk: bytes) -> list[Event]:
        if not chunk:
            return []
        if self._after_cr:
            self._after_cr = False
            self._skip = 1 if chunk.startswith(b"\n") else 0
        self._pending += chunk
        events: list[Event] = []
        while (event := self._next()) is not None:
            events.append(event)
        return events

    def _next(self) -> Event | None:
        buffer = self._pending
        position = self._skip
        data: list[bytes] = []
        while True:
            end = _LINE_END.search(buffer, position)
            if end is None:
                return None
            line = buffer[position : end.start()]
            at_end = end.end() == len(buffer)
            if end.group() == b"\r" and at_end and line:
                return None  # the LF of a CRLF may still be on its way
            position = end.end()
            if not line:
                self._pending, self._skip = buffer[position:], 0
                self._after_cr = end.group() == b"\r" and at_end
                return Event(buffer[:position], b"\n".join(data) if data else None)
            name, colon, value = line.partition(b":")
            if name == b"data":
                data.append(value[1:] if colon and value.startswith(b" ") else value)


class EventStreamResponse:
    """A `text/event-stream` response that races its body against the client going away.

    Starlette's `StreamingResponse` only notices a disconnect when the server says so on `send`
    (ASGI 2.4) or by listening (older servers), and may leave a generator parked at a `yield` for
    the garbage collector; a relay needs to stop reading its upstream the moment the client is gone.
    """

    def __init__(
        self,
        body: AsyncGenerator[bytes, None],
        *,
        status: int = 200,
        headers: Mapping[str, str] | None = None,
        on_close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.body = body
        self.on_close = on_close
        self.status_code = status
        self.headers = {
            "content-type": "text/event-stream; charset=utf-8",
            "cache-control": "no-cache",
            **(headers or {}),
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        async with anyio.create_task_group() as group:

            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                group.cancel_scope.cancel()  # the client is gone: stop the body where it is

            group.start_soon(watch)
            try:
                await send({"type": "http.response.start", "status": self.status_code,
                            "headers": raw_headers})  # fmt: skip
                async for chunk in self.body:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:
                pass  # ASGI 2.4 servers raise on `send` once the client has disconnected
            finally:
                # Shielded: after a disconnect the scope is cancelled, and the generator's own
                # cleanup (closing its upstream) must still run to the end; it bounds itself.
                with anyio.move_on_after(CLOSE_TIMEOUT, shield=True):
                    try:
                        await self.body.aclose()
                    finally:
                        if self.on_close is not None:
                            await self.on_close()
                group.cancel_scope.cancel()
