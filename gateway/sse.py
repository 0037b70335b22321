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
  the garbage collector. The disconnect does not interrupt that cleanup; it is bounded in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import NamedTuple

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


class Event(NamedTuple):
    """One whole event: its bytes as received, and its data (`None` when it had no data line).
    A tuple: one is made for every event relayed, and a frozen dataclass costs 3x as much."""

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
        if not self._skip and b"\r" not in self._pending:
            return self._lf_events()  # what every engine sends: the same events, faster
        events: list[Event] = []
        while (event := self._next()) is not None:
            events.append(event)
        return events

    def _lf_events(self) -> list[Event]:
        """`_next`, for a buffer whose lines all end in LF: an event ends at the first `\n\n`,
        and the usual one is a single `data:` line."""
        buffer = self._pending
        events: list[Event] = []
        position = 0
        while True:
            if buffer.startswith(b"\n", position):  # an empty line: an event with no lines
                events.append(Event(b"\n", None))
                position += 1
                continue
            blank = buffer.find(b"\n\n", position)
            if blank < 0:
                break
            lines = buffer[position:blank]
            if lines.startswith(b"data:") and b"\n" not in lines:
                data: bytes | None = lines[6:] if lines.startswith(b"data: ") else lines[5:]
            else:
                data = _data_of(lines.split(b"\n"))
            events.append(Event(buffer[position : blank + 2], data))
            position = blank + 2
        self._pending = buffer[position:]
        return events

    def _next(self) -> Event | None:
        buffer = self._pending
        position = self._skip
        lines: list[bytes] = []
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
                return Event(buffer[:position], _data_of(lines))
            lines.append(line)


def _data_of(lines: list[bytes]) -> bytes | None:
    """An event's data: its `data` lines' values, joined with LF; `None` when it has none."""
    data: list[bytes] = []
    for line in lines:
        name, colon, value = line.partition(b":")
        if name == b"data":
            data.append(value[1:] if colon and value.startswith(b" ") else value)
    return b"\n".join(data) if data else None


class EventStreamResponse:
    """A `text/event-stream` response that races its body against the client going away.

    Starlette's `StreamingResponse` only notices a disconnect when the server says so on `send`
    (ASGI 2.4) or by listening (older servers), and may leave a generator parked at a `yield` for
    the garbage collector; a relay needs to stop reading its upstream the moment the client is gone.
    Plain asyncio: one watcher task per response, no task group or cancel scope (anyio's formats
    the task's repr on every cancel, a measurable part of a stream's cost).
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
        task = asyncio.current_task()
        assert task is not None
        sending = True  # while true, a disconnect cancels this task where it waits
        gone = False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            if sending:
                task.cancel()  # the client is gone: stop the body where it is

        watcher = asyncio.create_task(watch())
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": raw_headers})  # fmt: skip
            async for chunk in self.body:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # ASGI 2.4 servers raise on `send` once the client has disconnected
        except asyncio.CancelledError:
            if not gone:
                raise  # not ours: the server is shutting down
            task.uncancel()
        finally:
            # From here on a disconnect cancels nothing: the generator's own cleanup (closing its
            # upstream) must run to the end. It is bounded in time.
            sending = False
            watcher.cancel()
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    try:
                        await self.body.aclose()
                    finally:
                        if self.on_close is not None:
                            await self.on_close()
            finally:
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
